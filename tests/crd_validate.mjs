// Validates custom resources against their CRDs' schemas, as compiled by the
// @kubernetes-models packages. test_chart.py installs them; their
// node_modules folder is the one argument:
//
//   node crd_validate.mjs NODE_MODULES < resources.jsonl
//
// Reads one JSON object per line; writes one JSON line per object:
// {"ok": true} or {"error": "..."}.
import { join } from "node:path";
import { createInterface } from "node:readline";
import { pathToFileURL } from "node:url";

const nodeModules = process.argv[2];

const MODELS = {
  "monitoring.coreos.com/v1/ServiceMonitor": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor",
  "monitoring.coreos.com/v1/PodMonitor": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor",
  "monitoring.coreos.com/v1/PrometheusRule": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule",
  "cert-manager.io/v1/Certificate": "@kubernetes-models/cert-manager/cert-manager.io/v1/Certificate",
};

for await (const line of createInterface({ input: process.stdin })) {
  const resource = JSON.parse(line);
  const module = MODELS[`${resource.apiVersion}/${resource.kind}`];
  let result;
  if (!module) {
    result = { error: `no schema for ${resource.apiVersion} ${resource.kind}` };
  } else {
    const Model = (await import(pathToFileURL(join(nodeModules, `${module}.js`))))[resource.kind];
    try {
      new Model(resource).validate();
      result = { ok: true };
    } catch (error) {
      result = { error: error.message };
    }
  }
  console.log(JSON.stringify(result));
}
