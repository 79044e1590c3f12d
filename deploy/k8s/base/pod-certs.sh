#!/bin/sh
# Init container of every rlhf pod: signs a TLS certificate for this pod with the cluster's CA
# (Secret `rlhf-ca`, mounted at /secrets/ca) for the names and addresses in RLHF_CERT_SANS
# (space separated; `rlhf certs` adds localhost and 127.0.0.1), and leaves in /certs (an
# in-memory emptyDir the main container mounts read-only) ca.pem, pod.pem and pod.key. The CA
# key is removed again: the main container never sees it. A pod's IP is known only once it
# runs, so its certificate cannot be made in advance.
set -eu
out=/certs
cp /secrets/ca/ca.pem /secrets/ca/ca.key "$out/"
set --
for san in ${RLHF_CERT_SANS:-}; do
  set -- "$@" --san "$san"
done
rlhf certs --out "$out" --name pod "$@"
rm -f "$out/ca.key"
ls -l "$out"
