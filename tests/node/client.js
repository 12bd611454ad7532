// A Node.js client of sluice.v1.Inference, loading the contract from proto/ at run time.
// Usage: node client.js HOST:PORT '<64 pixel values as JSON>'
// Prints one JSON line: the Predict answer and every StreamPredict answer by id.
"use strict";
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const protoRoot = path.join(__dirname, "..", "..", "proto");
const definition = protoLoader.loadSync(path.join(protoRoot, "sluice", "v1", "inference.proto"), {
  keepCase: true, longs: String, enums: String, defaults: true, oneofs: true, includeDirs: [protoRoot],
});
const sluice = grpc.loadPackageDefinition(definition).sluice.v1;
const client = new sluice.Inference(process.argv[2], grpc.credentials.createInsecure());
const pixels = new Float32Array(JSON.parse(process.argv[3]));

function tensor(values, datatype = "DATA_TYPE_FP32") {
  return { name: "pixels", datatype, shape: [1, 64], raw_contents: Buffer.from(values.buffer) };
}

function label(response) {
  const out = response.outputs.find((t) => t.name === "label");
  return Number(out.raw_contents.readBigInt64LE(0));
}

client.Predict({ model: "digits", id: "node-1", inputs: [tensor(pixels)] }, (err, response) => {
  if (err) { console.error(err.message); process.exit(1); }
  const result = { predict: { id: response.id, version: Number(response.model_version), label: label(response) }, stream: {} };
  const call = client.StreamPredict();
  call.on("data", (answer) => {
    result.stream[answer.id] = answer.code === 0 ? { label: label(answer.response) } : { code: answer.code, message: answer.message };
  });
  call.on("error", (e) => { console.error(e.message); process.exit(1); });
  call.on("end", () => { console.log(JSON.stringify(result)); client.close(); });
  call.write({ model: "digits", id: "s1", inputs: [tensor(pixels)] });
  call.write({ model: "digits", id: "bad", inputs: [tensor(new Float64Array(64), "DATA_TYPE_FP64")] });
  call.write({ model: "digits", id: "s2", inputs: [tensor(pixels)] });
  call.end();
});
