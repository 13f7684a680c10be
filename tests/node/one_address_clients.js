// Many real socket.io clients (socket.io-client from npm) behind ONE address, as behind a NAT or a proxy.
//
//   node one_address_clients.js URL TRANSPORTS IP COUNT [SOURCES]
//
// COUNT clients connect from IP through one shared keep-alive http.Agent, so their
// polling requests share pooled connections as a browser's or a proxy's would. With
// SOURCES (a comma-separated list of addresses) each client's requests move through
// those addresses in turn instead: a client whose address changes mid-session. Each
// client asks "whoami" with an ack, three clients shout, every client collects what
// it hears. Prints one JSON object: per client, the error or the worker, the sid, the
// transport and what was heard. Exits 0 whatever happened: the test judges.
"use strict";
const http = require("http");
const { io } = require("socket.io-client");

const [url, transportList, ip, countText, sourcesText] = process.argv.slice(2);
const transports = transportList.split(",");
const count = Number(countText);
const SHOUTS = ["first", "second", "third"];
const results = {};

function settle(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function waitFor(condition, ms) {
  const deadline = Date.now() + ms;
  while (!condition() && Date.now() < deadline) await settle(20);
}

// One agent for every client: pooled keep-alive connections carry requests of many sessions.
const shared = new http.Agent({ localAddress: ip, keepAlive: true, maxSockets: 8 });

// An agent whose every new connection comes from the next of SOURCES.
function movingAgent(sources) {
  let turn = 0;
  const agent = new http.Agent({ keepAlive: false });
  const create = agent.createConnection.bind(agent);
  agent.createConnection = (options, callback) => {
    const localAddress = sources[Math.min(turn, sources.length - 1)];
    turn += 1;
    return create({ ...options, localAddress }, callback);
  };
  return agent;
}

function connect(name) {
  const result = { heard: [], error: null, worker: null, transport: null, sids: [], upgrades: 0 };
  results[name] = result;
  const agent = sourcesText ? movingAgent(sourcesText.split(",")) : shared;
  const socket = io(url, { transports, agent, reconnection: false, timeout: 10000 });
  socket.on("heard", (data) => result.heard.push(data.text));
  socket.on("disconnect", (reason) => {
    if (!result.leaving) result.error = result.error || `disconnected: ${reason}`;
  });
  return new Promise((resolve) => {
    socket.on("connect", () => {
      result.sids.push(socket.io.engine.id);
      socket.io.engine.on("upgrade", () => (result.upgrades += 1));
      resolve(socket);
    });
    socket.on("connect_error", (error) => {
      result.error = `connect_error: ${error.message}`;
      resolve(null);
    });
  });
}

async function main() {
  const sockets = {};
  const names = Array.from({ length: count }, (_, n) => `client-${n}`);
  await Promise.all(
    names.map(async (name) => {
      const socket = await connect(name);
      if (socket) sockets[name] = socket;
    }),
  );
  const live = () => Object.entries(sockets).filter(([name]) => !results[name].error);
  for (const result of Object.values(results)) result.leaving = false;
  if (transports.includes("websocket")) {
    await waitFor(() => live().every(([, s]) => s.io.engine.transport.name === "websocket"), 20000);
  }
  await Promise.all(
    live().map(async ([name, socket]) => {
      try {
        const who = await socket.timeout(10000).emitWithAck("whoami");
        results[name].worker = who.worker;
        results[name].client = who.client || null;
      } catch (error) {
        results[name].error = `whoami: ${error.message}`;
      }
    }),
  );
  const speakers = live();
  for (let n = 0; n < SHOUTS.length && speakers.length; n++) {
    speakers[(n * 7) % speakers.length][1].emit("shout", SHOUTS[n]);
  }
  await waitFor(() => live().every(([name]) => results[name].heard.length >= SHOUTS.length), 20000);
  await settle(500); // anything arriving twice arrives now
  for (const [name, socket] of Object.entries(sockets)) {
    results[name].transport = socket.io.engine ? socket.io.engine.transport.name : null;
    results[name].sids.push(socket.io.engine ? socket.io.engine.id : null);
    results[name].leaving = true;
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
