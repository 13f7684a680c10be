// Real socket.io clients (socket.io-client from npm), one per source address, for the acceptance tests.
//
//   node chat_clients.js URL TRANSPORTS IP [IP ...]
//
// TRANSPORTS is "polling" or "polling,websocket". Each client connects from its own
// 127.x address (an http.Agent with localAddress, new TCP connection per request),
// asks "whoami" with an ack, then three clients shout; every client collects what
// it hears (chat_run.js). Prints one JSON object: per address, the error or the
// worker, the transport and what was heard. Exits 0 whatever happened: the test judges.
"use strict";
const http = require("http");
const { run, report } = require("./chat_run");

const [url, transportList, ...ips] = process.argv.slice(2);

report(() =>
  run(url, transportList.split(","), ips, {
    agentFor: (ip) => new http.Agent({ localAddress: ip, keepAlive: false }),
    localAddress: (ip) => ip,
  }),
);
