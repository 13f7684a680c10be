// The chat run both client scripts share: connect every client, wait for the upgrade, ask
// "whoami", let three clients shout, collect what each hears, report one JSON object.
//
// run(names, transports, options) where options.agentFor(name) gives the http.Agent of a
// client and options.localAddress(name) its source address (or undefined).
"use strict";
const { io } = require("socket.io-client");

const SHOUTS = ["first", "second", "third"];

function settle(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function waitFor(condition, ms) {
  const deadline = Date.now() + ms;
  while (!condition() && Date.now() < deadline) await settle(20);
}

function connect(url, transports, name, results, options) {
  const result = { heard: [], error: null, worker: null, transport: null, sids: [] };
  results[name] = result;
  const socket = io(url, {
    transports,
    agent: options.agentFor(name),
    localAddress: options.localAddress(name),
    reconnection: false,
    timeout: 10000,
  });
  socket.on("heard", (data) => result.heard.push(data.text));
  socket.on("disconnect", (reason) => {
    if (!result.leaving) result.error = result.error || `disconnected: ${reason}`;
  });
  return new Promise((resolve) => {
    socket.on("connect", () => {
      result.sids.push(socket.io.engine.id);
      resolve(socket);
    });
    socket.on("connect_error", (error) => {
      result.error = `connect_error: ${error.message}`;
      resolve(null);
    });
  });
}

async function run(url, transports, names, options) {
  const results = {};
  const sockets = {};
  await Promise.all(
    names.map(async (name) => {
      const socket = await connect(url, transports, name, results, options);
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
  return results;
}

// Runs main() and prints its results (or the error) as one JSON line; exits 0: the test judges.
function report(main) {
  main()
    .then((results) => {
      process.stdout.write(JSON.stringify(results) + "\n");
      process.exit(0);
    })
    .catch((error) => {
      process.stdout.write(JSON.stringify({ fatal: String(error && error.stack) }) + "\n");
      process.exit(0);
    });
}

module.exports = { run, report };
