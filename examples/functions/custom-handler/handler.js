// A custom handler in Node (no dependencies): the Functions host contract. It listens on
// FUNCTIONS_CUSTOMHANDLER_PORT; POST /ProcessOrder gets {"Data": {"order": "<text>"},
// "Metadata": {...}} and answers {"Outputs": {"receipt": ...}, "Logs": [...]}.
// An order with "fail": true gets a 500 with a text body, as a handler that gives up.
const http = require("http");

const port = Number(process.env.FUNCTIONS_CUSTOMHANDLER_PORT || 8080);

function reply(res, status, body, type = "application/json") {
  res.writeHead(status, { "Content-Type": type });
  res.end(type === "application/json" ? JSON.stringify(body) : body);
}

http
  .createServer((req, res) => {
    let raw = "";
    req.on("data", (chunk) => (raw += chunk));
    req.on("end", () => {
      if (req.method === "GET") return reply(res, 200, "ok", "text/plain");
      if (req.url !== "/ProcessOrder") return reply(res, 404, "no such function", "text/plain");
      const { Data, Metadata } = JSON.parse(raw);
      const order = JSON.parse(Data.order);
      if (order.fail) return reply(res, 500, `cannot process order ${order.id}: out of stock`, "text/plain");
      const ms = Math.round((order.seconds || 0) * 1000);
      setTimeout(() => {
        reply(res, 200, {
          Outputs: { receipt: JSON.stringify({ order: order.id, total: order.qty * 9.5 }) },
          Logs: [`order ${order.id} (queue message ${Metadata.Id}, dequeue ${Metadata.DequeueCount}) processed`],
          ReturnValue: null,
        });
      }, ms);
    });
  })
  .listen(port, "127.0.0.1", () => console.log(`handler listening on ${port}`));
