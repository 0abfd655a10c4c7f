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

// Output is coalesced. tslab sends one iopub message per stdout/stderr write with zeromq.js's Publisher.send,
// which sends at once while libzmq takes the message and otherwise leaves it pending until the event loop runs
// again; while one is pending, every other send throws "Socket is busy writing" (and console.log swallows
// that). Inside a synchronous loop (`for (...) console.log(i)`) nothing pending can complete, so after a few
// hundred messages (measured: about 1.9 KB of stdout) all further output was dropped, the output cap never saw
// the flood, and the execution ran on to its timeout. Here each execution's writes are gathered into one buffer
// and sent as one message when the buffer reaches FLUSH_BYTES or a write comes FLUSH_MS after the last send
// (inside the loop itself, so that the output reaches the gateway, whose cap interrupts the loop, and a loop that
// prints now and then shows each line at once), or on the next turn of the event loop, and always before a display, before the execution's reply and when the stream
// changes (stdout/stderr keep their order). A send that finds the socket busy keeps its text for a retry; past
// MAX_HELD_BYTES held, further text is dropped and the number of bytes dropped is said when sending resumes.
const FLUSH_BYTES = 64 * 1024;
const MAX_HELD_BYTES = 32 * 1024 * 1024;
const FLUSH_MS = 10;
const RETRY_MS = 5;
const impl = jupyter.JupyterHandlerImpl.prototype;

function coalesce(writeStream, writeDisplayData) {
  let name = null;
  let parts = [];
  let size = 0;
  let dropped = 0;
  let scheduled = false;
  let lastSent = 0;
  // Sends what is held; false (and everything still held) when the socket is busy.
  const flush = () => {
    if (!parts.length && !dropped) {
      return true;
    }
    let text = parts.join("");
    if (dropped) {
      text += `\n[kernelhub: ${dropped} bytes of output were dropped: the kernel could not send them]\n`;
    }
    try {
      writeStream(name, text);
    } catch (e) {
      // Busy (a send is pending): hold it all, the note of what was dropped included, for a retry.
      parts = [text];
      size = text.length;
      dropped = 0;
      schedule(RETRY_MS);
      return false;
    }
    parts = [];
    size = 0;
    dropped = 0;
    lastSent = Date.now();
    return true;
  };
  const schedule = (delay) => {
    if (!scheduled) {
      scheduled = true;
      const run = () => {
        scheduled = false;
        flush();
      };
      if (delay) {
        setTimeout(run, delay);
      } else {
        setImmediate(run);
      }
    }
  };
  const write = (stream, text) => {
    if (stream !== name) {
      if (!flush()) {
        dropped += text.length;
        return;
      }
      name = stream;
    }
    if (size >= MAX_HELD_BYTES) {
      dropped += text.length;
      return;
    }
    parts.push(text);
    size += text.length;
    if (size >= FLUSH_BYTES || Date.now() - lastSent >= FLUSH_MS) {
      flush();
    } else {
      schedule(0);
    }
  };
  const display = (data, update) => {
    flush();
    writeDisplayData(data, update);
  };
  // Before the reply: waits (up to drainMs) for a busy socket, so that the output is published before the
  // execution's end.
  const drain = async (drainMs) => {
    const until = Date.now() + drainMs;
    while (!flush() && Date.now() < until) {
      await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
    }
  };
  return { write, display, drain };
}

const originalExecute = impl.handleExecuteImpl;
impl.handleExecuteImpl = async function (req, writeStream, writeDisplayData) {
  const out = coalesce(writeStream, writeDisplayData);
  try {
    return await originalExecute.call(this, req, out.write, out.display);
  } finally {
    await out.drain(5000);
  }
};
