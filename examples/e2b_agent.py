"""An agent step written for E2B, unchanged: it runs against kernelhub by its three environment variables.

    export E2B_API_KEY=<a kernelhub key>                # kernelhub serve --token ..., or one of --api-keys
    export E2B_API_URL=http://127.0.0.1:8888/e2b
    export E2B_SANDBOX_URL=http://127.0.0.1:8888/e2b
    python examples/e2b_agent.py

It does what a data-analysis agent's tool calls do: upload data, run code on it (streaming its output), draw a
chart, use the shell, start a background server and stop it, then kill the sandbox. Nothing in it names
kernelhub.
"""

from __future__ import annotations

import time

from e2b_code_interpreter import Sandbox


def main() -> None:
    started = time.monotonic()
    sandbox = Sandbox.create(timeout=300)
    first = sandbox.run_code("print(1)")
    print(f"Sandbox.create() + run_code('print(1)'): {time.monotonic() - started:.2f} s -> "
          f"{first.logs.stdout!r}")
    try:
        sandbox.files.write("/home/user/numbers.csv", "n\n" + "\n".join(str(i) for i in range(1, 10)) + "\n")
        analysis = sandbox.run_code(
            "import pandas as pd\n"
            "df = pd.read_csv('/home/user/numbers.csv')\n"
            "df['square'] = df.n ** 2\n"
            "print('rows:', len(df))\n"
            "float(df.square.mean())",
            on_stdout=lambda message: print("  [stdout]", message.line, end=""),
        )
        print(f"mean of the squares: {float(analysis.text or 'nan'):.1f}")
        chart = sandbox.run_code(
            "import matplotlib.pyplot as plt\n"
            "plt.plot(df.n, df.square); plt.title('squares'); plt.show()"
        )
        print(f"chart saved: {sum(1 for r in chart.results if r.png)} png")
        listing = sandbox.commands.run("ls -l /home/user && python3 --version")
        print("shell:", listing.stdout.strip().splitlines()[-1])
        server = sandbox.commands.run("python3 -m http.server 8000 --bind 127.0.0.1", background=True)
        probe = sandbox.commands.run(
            "for i in $(seq 50); do code=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8000/) && break; "
            "sleep 0.1; done; echo $code")
        print(f"background server {server.pid} answered {probe.stdout.strip() or 'nothing'}")
        server.kill()
        print("files:", sorted(entry.name for entry in sandbox.files.list("/home/user")))
    finally:
        sandbox.kill()
    print(f"done in {time.monotonic() - started:.2f} s")


if __name__ == "__main__":
    main()
