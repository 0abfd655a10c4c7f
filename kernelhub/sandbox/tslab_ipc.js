// Preloaded into tslab (node -r) inside sandboxes. tslab binds "ipc://<ip>:<port>", while every Jupyter
// client connects to "ipc://<ip>-<port>" for the ipc transport; bind where clients look.
"use strict";
const jupyter = require("/node_modules/tslab/dist/jupyter.js");
const original = jupyter.ZmqServer.prototype.bindSocket;
jupyter.ZmqServer.prototype.bindSocket = async function (sock, port) {
  const conn = this.connInfo;
  if (conn.transport === "ipc") {
    await sock.bind(`ipc://${conn.ip}-${port}`);
    return;
  }
  return original.call(this, sock, port);
};

// Output is coalesced. tslab sends one iopub message per stdout/stderr write (zeromq.js's Publisher.send, whose
// promise nobody awaits); during a synchronous loop (`for (...) console.log(i)`) those sends cannot complete
// while the loop holds the event loop, so after a few hundred messages (measured: about 1.9 KB of stdout) nothing
// more reached the gateway, the output cap never saw the flood, and the execution ran on to its timeout (or the
// queued messages filled the sandbox's memory: oom). Here each execution's writes are gathered into one buffer
// and sent as one message when the buffer reaches FLUSH_BYTES (inside the loop itself, so that output reaches
// the gateway, whose cap interrupts the loop) or on the next turn of the event loop (so that a cell that prints a
// little shows it at once), and always before a display, before the execution's reply and when the stream
// changes (stdout/stderr keep their order).
const FLUSH_BYTES = 64 * 1024;
const impl = jupyter.JupyterHandlerImpl.prototype;

function coalesce(writeStream, writeDisplayData) {
  let name = null;
  let parts = [];
  let size = 0;
  let scheduled = false;
  const flush = () => {
    if (parts.length) {
      const text = parts.join("");
      const stream = name;
      parts = [];
      size = 0;
      writeStream(stream, text);
    }
  };
  const write = (stream, text) => {
    if (stream !== name) {
      flush();
      name = stream;
    }
    parts.push(text);
    size += text.length;
    if (size >= FLUSH_BYTES) {
      flush();
    } else if (!scheduled) {
      scheduled = true;
      setImmediate(() => {
        scheduled = false;
        flush();
      });
    }
  };
  const display = (data, update) => {
    flush();
    writeDisplayData(data, update);
  };
  return { write, display, flush };
}

const originalExecute = impl.handleExecuteImpl;
impl.handleExecuteImpl = async function (req, writeStream, writeDisplayData) {
  const out = coalesce(writeStream, writeDisplayData);
  try {
    return await originalExecute.call(this, req, out.write, out.display);
  } finally {
    out.flush();
  }
};
