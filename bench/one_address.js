// bench/peers.py's one-address load: COUNT socket.io clients behind ONE address (one shared keep-alive
// agent, as behind a NAT or a proxy) connect, upgrade to websocket and ask "whoami" (the pid that serves
// them). Prints one JSON object: the milliseconds until every client was connected, upgraded and
// answered, and how many clients each pid served.
//
//   NODE_PATH=tests/node/node_modules node bench/one_address.js URL IP COUNT
"use strict";
const http = require("http");
const { io } = require("socket.io-client");

const [url, ip, countText] = process.argv.slice(2);
const agent = new http.Agent({ localAddress: ip, keepAlive: true, maxSockets: 8 });

function client() {
  return new Promise((resolve) => {
    const socket = io(url, { transports: ["polling", "websocket"], agent, reconnection: false, timeout: 20000 });
    socket.on("connect_error", (error) => resolve({ socket, error: error.message }));
    socket.on("connect", () => {
      const asked = () =>
        socket
          .timeout(20000)
          .emitWithAck("whoami")
          .then((who) => resolve({ socket, pid: who.pid }))
          .catch((error) => resolve({ socket, error: error.message }));
      if (socket.io.engine.transport.name === "websocket") asked();
      else socket.io.engine.once("upgrade", asked);
    });
  });
}

async function main() {
  const started = Date.now();
  const clients = await Promise.all(Array.from({ length: Number(countText) }, client));
  const elapsed = Date.now() - started;
  const perPid = {};
  let errors = 0;
  for (const { socket, pid, error } of clients) {
    if (error) errors += 1;
    else perPid[pid] = (perPid[pid] || 0) + 1;
    socket.disconnect();
  }
  process.stdout.write(JSON.stringify({ ms: elapsed, perPid, errors }) + "\n");
  setTimeout(() => process.exit(0), 200);
}

main();
