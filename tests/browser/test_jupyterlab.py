"""JupyterLab in headless Chromium, in gateway mode in front of kernelhub, used the way a person uses it.

For every kernelhub kernelspec: a notebook made from the launcher runs its first cell the instant the status bar
shows the kernel Idle (the race of issue 7.3: a cell run within about half a second of Idle stayed ``[ ]``
forever), and a notebook file opened fresh runs all its cells from Run > Run All Cells, clicked the instant the
kernel is Idle. The python notebook also draws a matplotlib plot, which must show as a PNG ``<img>``.

Nothing waits a fixed time: every wait is on a DOM state, bounded. A failure names its screenshot and the
websocket frames the page exchanged with the kernel, says what came back for each request the page sent, and how
many websocket connections the gateway holds for the kernel. Each passing test prints how long, on the page's
clock, it took from Idle showing to the execute_request leaving the page (tens of ms: inside the race window).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat
import pytest
from playwright.sync_api import Error, Locator, Page, expect

from kernelhub.sandbox.provisioner import KERNELSPECS_DIR
from kernelhub.testing import Gateway
from tests.browser.conftest import Frames, JupyterLab

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups, pytest.mark.slow]

#: The kernelspecs the gateway serves (it reads this directory); the first test checks JupyterLab lists exactly
#: these, so a kernelspec added later is covered or fails here.
KERNELSPECS = sorted(p.name for p in KERNELSPECS_DIR.iterdir() if (p / "kernel.json").is_file())

#: Per language, a cell and the line it prints. The line is computed, so the echo of the source cannot match.
FIRST_CELL = {
    "python": ('print("kernelhub-" + str(6 * 7))', "kernelhub-42"),
    "javascript": ('console.log("kernelhub-" + 6 * 7)', "kernelhub-42"),
    "typescript": ('const n: number = 6 * 7;\nconsole.log("kernelhub-" + n)', "kernelhub-42"),
    "bash": ("echo kernelhub-$((6 * 7))", "kernelhub-42"),
}
#: Per language, cells that build on each other, for Run All: each one's output depends on the ones before.
RUN_ALL = {
    "python": [("a = 6 * 7\nprint('one', a)", "one 42"), ("b = a + 1\nprint('two', b)", "two 43"),
               ("print('three', a + b)", "three 85")],
    "javascript": [("var a = 6 * 7;\nconsole.log('one', a)", "one 42"),
                   ("var b = a + 1;\nconsole.log('two', b)", "two 43"),
                   ("console.log('three', a + b)", "three 85")],
    "typescript": [("const a: number = 6 * 7;\nconsole.log('one', a)", "one 42"),
                   ("const b: number = a + 1;\nconsole.log('two', b)", "two 43"),
                   ("console.log('three', a + b)", "three 85")],
    "bash": [("a=$((6 * 7)); echo one $a", "one 42"), ("b=$((a + 1)); echo two $b", "two 43"),
             ("echo three $((a + b))", "three 85")],
}
PLOT = "import matplotlib.pyplot as plt\nplt.plot([0, 1, 2, 3], [0, 1, 4, 9])\nplt.title('kernelhub')\nplt.show()"

#: A kernel's start: a sandbox, then the kernel (bash_kernel alone takes 2.6 s, KERNELS.md) on a loaded machine.
IDLE_TIMEOUT_MS = 60_000
#: A print on an idle kernel answers within a second (KERNELS.md); a lost request never answers.
OUTPUT_TIMEOUT_MS = 20_000
#: The first plot imports matplotlib and may build its font cache in the sandbox.
PLOT_TIMEOUT_MS = 60_000


def spec_of(lab: JupyterLab, name: str) -> dict[str, Any]:
    status, body = lab.request("GET", f"/api/kernelspecs/{name}")
    assert status == 200, body
    spec: dict[str, Any] = body["spec"]
    return spec


def language_cells(table: dict[str, Any], spec: dict[str, Any]) -> Any:
    assert spec["language"] in table, f"no cell written for kernels of language {spec['language']!r}"
    return table[spec["language"]]


#: Resolves the moment the status bar's kernel item reads "<display name> | Idle" (a MutationObserver in the page,
#: so no polling interval and no round trip per check stand between Idle and the test's next action).
WAIT_FOR_IDLE = """([text, timeoutMs]) => new Promise((resolve, reject) => {
  const idle = () => [...document.querySelectorAll('.jp-StatusBar-TextItem')].some(i => i.textContent === text);
  if (idle()) return resolve();
  const observer = new MutationObserver(() => {
    if (idle()) { observer.disconnect(); clearTimeout(timer); resolve(); }
  });
  const timer = setTimeout(() => {
    observer.disconnect();
    reject(new Error(`the status bar did not read "${text}" within ${timeoutMs} ms`));
  }, timeoutMs);
  observer.observe(document, {subtree: true, childList: true, characterData: true});
})"""


def wait_for_idle(page: Page, display_name: str) -> None:
    """Returns the moment the status bar shows the kernel Idle: what a person waits for before running a cell."""
    page.evaluate(WAIT_FOR_IDLE, [f"{display_name} | Idle", IDLE_TIMEOUT_MS])


def cells(page: Page) -> Locator:
    return page.locator(".jp-NotebookPanel .jp-CodeCell")


def run_with_evidence(page: Page, frames: Frames, gw: Gateway, artifacts: Path, label: str,
                      steps: Callable[[], None]) -> None:
    """Runs ``steps`` and saves a screenshot of the page after; if a wait in them failed, fails the test with
    what the kernel websocket carried for each request the page sent, the cells' prompts, how the gateway sees
    the kernel (its open websocket connections, its state), and where the screenshot and the frames are."""
    shot = artifacts / f"{label}.png"
    failure: AssertionError | Error | None = None
    try:
        steps()
    except (AssertionError, Error) as exc:
        failure = exc
    page.screenshot(path=shot)
    if failure is None:
        print(f"{label}: Idle shown -> execute_request sent: {frames.reaction_ms()} ms")
        return
    frame_log = frames.save(artifacts / f"{label}.frames.json")
    lines = [f"{label}: {str(failure).splitlines()[0]}", f"screenshot: {shot}", f"websocket frames: {frame_log}",
             f"cell prompts: {cells(page).locator('.jp-InputPrompt').all_inner_texts()}",
             f"Idle shown -> first execute_request sent: {frames.reaction_ms()} ms"]
    for request in frames.requests():
        answers = [f"{a['channel']}/{a['msg_type']}{' ' + a['execution_state'] if 'execution_state' in a else ''}"
                   for a in frames.answers(request["msg_id"])]
        lines.append(f"{request['msg_type']} {request['msg_id'][:8]} sent at {request['t']} s: "
                     + (f"answered by {answers}" if answers else "nothing came back for it"))
    for kernel_id in frames.kernel_ids():
        status, model = gw.request("GET", f"/api/kernels/{kernel_id}")
        lines.append(f"the gateway's kernel {kernel_id}: " + (
            f"{model['connections']} websocket connection(s), {model['execution_state']}" if status == 200
            else f"{status} {model}"))
    lines += ["kernel websocket frames:", frames.timeline()]
    pytest.fail("\n".join(lines), pytrace=False)


def test_jupyterlab_lists_every_kernelhub_kernelspec(lab: JupyterLab, page: Page) -> None:
    status, body = lab.request("GET", "/api/kernelspecs")
    assert status == 200, body
    assert sorted(body["kernelspecs"]) == KERNELSPECS
    page.goto(lab.workspace_url())
    for name in KERNELSPECS:
        title = body["kernelspecs"][name]["spec"]["display_name"]
        expect(page.locator(f".jp-LauncherCard[data-category='Notebook'][title='{title}']")).to_be_visible()


@pytest.mark.parametrize("kernelspec", KERNELSPECS)
def test_first_cell_runs_the_instant_the_kernel_is_idle(lab: JupyterLab, page: Page, frames: Frames, gateway: Gateway,
                                                        artifacts: Path, kernelspec: str) -> None:
    spec = spec_of(lab, kernelspec)
    code, printed = language_cells(FIRST_CELL, spec)

    def steps() -> None:
        page.goto(lab.workspace_url())
        page.locator(f".jp-LauncherCard[data-category='Notebook'][title='{spec['display_name']}']").click()
        # The cell is typed while the kernel starts; Shift+Enter goes the moment the status bar says Idle.
        cells(page).first.locator(".cm-content").click()
        page.keyboard.insert_text(code)
        wait_for_idle(page, spec["display_name"])
        page.keyboard.press("Shift+Enter")
        first = cells(page).first
        expect(first.locator(".jp-OutputArea-output")).to_contain_text(printed, timeout=OUTPUT_TIMEOUT_MS)
        expect(first.locator(".jp-InputPrompt")).to_contain_text("[1]:")
        if spec["language"] == "python":
            plot = cells(page).nth(1)
            plot.locator(".cm-content").click()
            page.keyboard.insert_text(PLOT)
            page.keyboard.press("Shift+Enter")
            image = plot.locator(".jp-OutputArea-output img[src^='data:image/png;base64,']")
            expect(image).to_be_visible(timeout=PLOT_TIMEOUT_MS)
            assert image.evaluate("img => img.naturalWidth") > 100, "the plot's PNG did not decode"

    run_with_evidence(page, frames, gateway, artifacts, f"first-cell-{kernelspec}", steps)


@pytest.mark.parametrize("kernelspec", KERNELSPECS)
def test_run_all_on_a_notebook_opened_fresh(lab: JupyterLab, page: Page, frames: Frames, gateway: Gateway,
                                            artifacts: Path, kernelspec: str) -> None:
    spec = spec_of(lab, kernelspec)
    cells_and_output = language_cells(RUN_ALL, spec)
    path = f"run-all-{kernelspec}.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code) for code, _ in cells_and_output])
    nb.metadata["kernelspec"] = {"name": kernelspec, "display_name": spec["display_name"],
                                 "language": spec["language"]}
    nbformat.write(nb, lab.root / path)

    def steps() -> None:
        page.goto(lab.workspace_url(path))
        expect(cells(page)).to_have_count(len(cells_and_output))
        # The Run menu is opened while the kernel starts; Run All Cells is clicked the moment it is Idle.
        page.get_by_role("menuitem", name="Run", exact=True).click()
        run_all = page.get_by_role("menuitem", name="Run All Cells", exact=True)
        run_all.wait_for()
        wait_for_idle(page, spec["display_name"])
        run_all.click()
        for i, (_, printed) in enumerate(cells_and_output):
            cell = cells(page).nth(i)
            expect(cell.locator(".jp-OutputArea-output")).to_contain_text(printed, timeout=OUTPUT_TIMEOUT_MS)
            expect(cell.locator(".jp-InputPrompt")).to_contain_text(f"[{i + 1}]:")

    run_with_evidence(page, frames, gateway, artifacts, f"run-all-{kernelspec}", steps)
