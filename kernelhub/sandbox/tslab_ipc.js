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
