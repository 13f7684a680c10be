// Many real socket.io clients (socket.io-client from npm) behind ONE address, as behind a NAT or a proxy.
//
//   node one_address_clients.js URL TRANSPORTS IP[,IP...] COUNT [SOURCES]
//
// COUNT clients connect from IP through one shared keep-alive http.Agent, so their
// polling requests share pooled connections as a browser's or a proxy's would (with
// several IPs, client N uses the Nth in turn, each IP with its own shared agent). With
// SOURCES (a comma-separated list of addresses) each client's connections come from
// those addresses in turn instead (the last one for the rest): a client whose address
// changes mid-session. The run is chat_run.js's; prints one JSON object, per client:
// the error or the worker, its session ids at the start and the end, the transport and
// what was heard. Exits 0 whatever happened: the test judges.
"use strict";
const http = require("http");
const { run, report } = require("./chat_run");

const [url, transportList, ip, countText, sourcesText] = process.argv.slice(2);
const names = Array.from({ length: Number(countText) }, (_, n) => `client-${n}`);

// One agent per address for all its clients: pooled keep-alive connections carry requests of many sessions.
const ips = ip.split(",");
const shared = ips.map((address) => new http.Agent({ localAddress: address, keepAlive: true, maxSockets: 8 }));
const turn = (name) => Number(name.split("-")[1]) % ips.length;

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

report(() =>
  run(url, transportList.split(","), names, {
    agentFor: (name) => (sourcesText ? movingAgent(sourcesText.split(",")) : shared[turn(name)]),
    localAddress: () => undefined,
  }).then((results) => {
    for (const [name, result] of Object.entries(results)) result.address = ips[turn(name)];
    return results;
  }),
);
