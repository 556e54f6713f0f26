// Validates Prometheus Operator resources (ServiceMonitor, PrometheusRule, ...) against the
// schemas of @kubernetes-models/prometheus-operator, which are generated from the
// operator's Go API types (the same source as its CRDs' openAPIV3Schema).
//
//   node validate-crds.mjs TOOLS_DIR < docs.json     # docs.json: a JSON array of objects
//
// TOOLS_DIR holds node_modules (deploy/ci/install-tools.sh puts it there). Prints one line
// per document; exits 1 if any document is invalid, 2 if a kind has no model.
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { readFileSync } from "node:fs";

const GROUP = "monitoring.coreos.com";
const toolsDir = process.argv[2];
const docs = JSON.parse(readFileSync(0, "utf8"));
let status = 0;
for (const doc of docs) {
  const [group, version] = doc.apiVersion.split("/");
  if (group !== GROUP) continue;
  const path = join(toolsDir, "node_modules/@kubernetes-models/prometheus-operator",
                    GROUP, version, "index.js");
  const models = await import(pathToFileURL(path).href);
  const Model = models[doc.kind];
  const name = `${doc.kind}/${doc.metadata?.name}`;
  if (!Model) {
    console.log(`${name}: no model for ${doc.apiVersion} ${doc.kind}`);
    status = Math.max(status, 2);
    continue;
  }
  try {
    new Model(doc).validate();
    console.log(`${name}: valid`);
  } catch (err) {
    console.log(`${name}: INVALID ${err.message}`);
    status = Math.max(status, 1);
  }
}
process.exit(status);
