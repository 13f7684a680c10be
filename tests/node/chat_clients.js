// Real socket.io clients (socket.io-client from npm), one per source address, for the acceptance tests.
//
//   node chat_clients.js URL TRANSPORTS IP [IP ...]
//
// TRANSPORTS is "polling" or "polling,websocket". Each client connects from its own
// 127.x address (an http.Agent with localAddress, new TCP connection per request),
// asks "whoami" with an ack, then three clients shout; every client collects what
// it hears. Prints one JSON object: per address, the error or the worker, the
// transport and what was heard. Exits 0 whatever happened: the test judges.
"use strict";
const http = require("http");
const { io } = require("socket.io-client");

const [url, transportList, ...ips] = process.argv.slice(2);
const transports = transportList.split(",");
const SHOUTS = ["first", "second", "third"];
const results = {};

function settle(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function waitFor(condition, ms) {
  const deadline = Date.now() + ms;
  while (!condition() && Date.now() < deadline) await settle(20);
}

function connect(ip) {
  const result = { heard: [], error: null, worker: null, transport: null };
  results[ip] = result;
  const agent = new http.Agent({ localAddress: ip, keepAlive: false });
  const socket = io(url, {
    transports,
    agent,
    localAddress: ip,
    reconnection: false,
    timeout: 10000,
  });
  socket.on("heard", (data) => result.heard.push(data.text));
  socket.on("disconnect", (reason) => {
    if (!result.leaving) result.error = result.error || `disconnected: ${reason}`;
  });
  return new Promise((resolve) => {
    socket.on("connect", () => resolve(socket));
    socket.on("connect_error", (error) => {
      result.error = `connect_error: ${error.message}`;
      resolve(null);
    });
  });
}

async function main() {
  const sockets = {};
  await Promise.all(
    ips.map(async (ip) => {
      const socket = await connect(ip);
      if (socket) sockets[ip] = socket;
    }),
  );
  const live = () => Object.entries(sockets).filter(([ip]) => !results[ip].error);
  for (const result of Object.values(results)) result.leaving = false;
  if (transports.includes("websocket")) {
    await waitFor(() => live().every(([, s]) => s.io.engine.transport.name === "websocket"), 15000);
  }
  await Promise.all(
    live().map(async ([ip, socket]) => {
      try {
        const who = await socket.timeout(5000).emitWithAck("whoami");
        results[ip].worker = who.worker;
        results[ip].client = who.client || null;
      } catch (error) {
        results[ip].error = `whoami: ${error.message}`;
      }
    }),
  );
  const speakers = live();
  for (let n = 0; n < SHOUTS.length && speakers.length; n++) {
    speakers[(n * 7) % speakers.length][1].emit("shout", SHOUTS[n]);
  }
  await waitFor(() => live().every(([ip]) => results[ip].heard.length >= SHOUTS.length), 20000);
  await settle(500); // anything arriving twice arrives now
  for (const [ip, socket] of Object.entries(sockets)) {
    results[ip].transport = socket.io.engine ? socket.io.engine.transport.name : null;
    results[ip].leaving = true;
    socket.disconnect();
  }
  await settle(300); // the close packets reach the servers before this process ends
  process.stdout.write(JSON.stringify(results) + "\n");
  process.exit(0);
}

main().catch((error) => {
  process.stdout.write(JSON.stringify({ fatal: String(error && error.stack) }) + "\n");
  process.exit(0);
});
