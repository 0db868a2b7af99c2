#!/usr/bin/env bash
# Create, set up, launch on and stop a Cloud TPU VM slice with gcloud, from a genjax checkout.
#
#   export TPU_NAME=my-slice TPU_ZONE=us-central2-b TPU_TYPE=v4-32
#   tpu_scripts/tpu_vm.sh create [--spot]        # the slice (one VM per host)
#   tpu_scripts/tpu_vm.sh setup [BUCKET]         # this checkout + genjax[tpu] on every host;
#                                                # BUCKET (Cloud Storage) at /mnt/genjax
#   tpu_scripts/tpu_vm.sh launch experiments/lm_pretrain.py --workdir /mnt/genjax/runs/lm ...
#   tpu_scripts/tpu_vm.sh logs [WORKER]          # follow a host's log (default: worker 0)
#   tpu_scripts/tpu_vm.sh stop                   # SIGTERM the run: it checkpoints, then exits
#   tpu_scripts/tpu_vm.sh delete                 # the slice
#
# `launch` starts the script on every host at once with --distributed (JAX reads the slice
# from the TPU metadata), in the background, logging to ~/genjax.log. On a slice of several
# hosts the workdir must be one directory all of them see: the bucket that `setup` mounts.
# A preempted spot slice cannot be restarted: delete, create, setup and launch with the
# same workdir again, and the run resumes from its newest checkpoint in the bucket.
#
# Environment: TPU_NAME and TPU_ZONE (required); TPU_TYPE (default v4-8); TPU_VERSION (the
# software version; by default the one Google names for the TPU generation); TPU_PROJECT
# (default: gcloud's configured project).
set -euo pipefail

# On every host, under its home directory: the checkout, the run's log and its process id.
REMOTE_DIR=genjax
LOG=genjax.log
PID=genjax.pid
MOUNT=/mnt/genjax  # where `setup` mounts the bucket
# A host's test for a run of ours going on (a pid file may outlive its process).
RUNNING="[ -f ~/$PID ] && grep -qa -- --distributed /proc/\$(cat ~/$PID)/cmdline 2> /dev/null"
APT="sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq"

die() {
  echo "tpu_vm.sh: $*" >&2
  exit 2
}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

# The TPU software version Google documents for each generation (cloud.google.com/tpu/docs/runtimes).
default_version() {
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) die "no default TPU_VERSION for TPU_TYPE=$1; set TPU_VERSION (gcloud compute tpus tpu-vm versions list)" ;;
  esac
}

# gcloud compute tpus tpu-vm SUBCOMMAND, for this slice.
tpu_vm() {
  local subcommand=$1
  shift
  gcloud compute tpus tpu-vm "$subcommand" "$@" --zone="$TPU_ZONE" ${TPU_PROJECT:+--project="$TPU_PROJECT"}
}

# Runs a shell command on every host of the slice at once.
on_every_host() {
  tpu_vm ssh "$TPU_NAME" --worker=all --command="$1"
}

checkout_root() {
  git -C "$(dirname "$0")" rev-parse --show-toplevel
}

create() {
  (($# == 0)) || [[ $* == --spot ]] || die "create takes only --spot, not $*"
  local type=${TPU_TYPE:-v4-8} version
  version=${TPU_VERSION:-$(default_version "$type")}
  tpu_vm create "$TPU_NAME" --accelerator-type="$type" --version="$version" \
    --scopes=https://www.googleapis.com/auth/cloud-platform "$@"
}

# Copies this checkout as it is now (the files git tracks, and new ones it does not
# ignore) to every host, installs Python 3.11 and genjax with jax[tpu] in a venv there,
# and mounts BUCKET at $MOUNT with gcsfuse when given.
setup() {
  (($# <= 1)) || die "setup takes at most one argument, a bucket, not: $*"
  local bucket=${1:-}
  bucket=${bucket#gs://}
  bucket=${bucket%/}
  [[ -z $bucket || $bucket =~ ^[a-z0-9][a-z0-9._-]*[a-z0-9]$ ]] ||
    die "setup: '$1' is not a bucket name (a bucket, not a folder in one: gs://my-bucket)"
  local root
  root=$(checkout_root)
  staging=$(mktemp -d)  # global: the trap runs after this function has returned
  trap 'rm -rf "$staging"' EXIT
  # Paths git still lists but that were deleted from the working tree are left out.
  (cd "$root" && git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done |
    COPYFILE_DISABLE=1 tar --null -T - -czf "$staging/genjax.tar.gz")
  tpu_vm scp "$staging/genjax.tar.gz" "$TPU_NAME:genjax.tar.gz" --worker=all
  local install="set -euo pipefail
if $RUNNING; then echo \"\$(hostname): a run is going on; tpu_vm.sh stop it first\" >&2; exit 1; fi
$APT update && $APT install -y python3.11 python3.11-venv
rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/genjax.tar.gz -C ~/$REMOTE_DIR
cd ~/$REMOTE_DIR && python3.11 -m venv .venv
.venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e '.[tpu]'
.venv/bin/python -c 'import genjax, jax; print(\"genjax on jax\", jax.__version__)'"
  if [[ -n $bucket ]]; then
    install+="
echo 'deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-'\$(lsb_release -cs)' main' | sudo tee /etc/apt/sources.list.d/gcsfuse.list
curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null
$APT update && $APT install -y fuse gcsfuse
sudo mkdir -p $MOUNT && sudo chown \$(id -u):\$(id -g) $MOUNT
mountpoint -q $MOUNT || gcsfuse --implicit-dirs $bucket $MOUNT"
  fi
  on_every_host "$install"
}

launch() {
  (($#)) || die "launch needs a script, e.g. experiments/lm_pretrain.py --workdir $MOUNT/runs/lm"
  [[ -f $(checkout_root)/$1 ]] ||
    die "launch: no script $1 in this checkout (a path from its root, e.g. experiments/lm_pretrain.py)"
  local command
  printf -v command '%q ' "$@"
  on_every_host "cd ~/$REMOTE_DIR || { echo \"\$(hostname): no ~/$REMOTE_DIR; run tpu_vm.sh setup first\" >&2; exit 1; }
if $RUNNING; then echo \"\$(hostname): a run is going on; tpu_vm.sh stop it first\" >&2; exit 1; fi
nohup .venv/bin/python $command--distributed >> ~/$LOG 2>&1 < /dev/null &
echo \$! > ~/$PID
echo \"\$(hostname): started; its log is ~/$LOG\""
}

logs() {
  tpu_vm ssh "$TPU_NAME" --worker="${1:-0}" --command="tail -n 100 -f ~/$LOG"
}

# SIGTERM: genjax saves a checkpoint (on a slice, at JAX's preemption sync point) and exits.
stop() {
  on_every_host "if $RUNNING; then
  kill -TERM \$(cat ~/$PID) && echo \"\$(hostname): stopping; it saves a checkpoint first\"
else
  echo \"\$(hostname): no run\"
fi"
}

delete() {
  tpu_vm delete "$TPU_NAME" --quiet
}

(($#)) || usage
action=$1
shift
case "$action" in
  create | setup | launch | logs | stop | delete) ;;
  -h | --help | help) usage ;;
  *) die "unknown command $action; one of: create setup launch logs stop delete" ;;
esac
[[ -n ${TPU_NAME:-} ]] || die "set TPU_NAME, the slice's name (e.g. export TPU_NAME=my-slice)"
[[ -n ${TPU_ZONE:-} ]] || die "set TPU_ZONE, the slice's zone (e.g. export TPU_ZONE=us-central2-b)"
command -v gcloud > /dev/null || die "gcloud is not on PATH; install the Google Cloud CLI"
"$action" "$@"
