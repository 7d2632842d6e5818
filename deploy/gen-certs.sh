#!/bin/sh
# Makes the certificates nanoplane's deployments mount, with openssl:
#   ca.pem / ca-key.pem                                 a private CA (keep ca-key.pem offline)
#   controlplane.pem / controlplane-key.pem             the public API's server certificate
#   dataplane.pem / dataplane-key.pem                   the data plane's server certificate
#   controlplane-client.pem / controlplane-client-key.pem   the control plane's identity towards the data plane
#
# Usage: deploy/gen-certs.sh [OUT_DIR]          (default: deploy/certs)
# More names in the server certificates, comma-separated in openssl's subjectAltName syntax:
#   CONTROLPLANE_SANS="DNS:api.example.com"  DATAPLANE_SANS="DNS:nanoplane-dataplane.prod.svc,IP:10.0.0.7"
# DAYS sets the validity (default 365).
set -eu

out=${1:-$(dirname "$0")/certs}
days=${DAYS:-365}
cp_sans="DNS:controlplane,DNS:nanoplane-controlplane,DNS:localhost,IP:127.0.0.1${CONTROLPLANE_SANS:+,$CONTROLPLANE_SANS}"
dp_sans="DNS:dataplane,DNS:nanoplane-dataplane,DNS:localhost,IP:127.0.0.1${DATAPLANE_SANS:+,$DATAPLANE_SANS}"

mkdir -p "$out"
cd "$out"
umask 077  # private keys readable by their owner only

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days "$days" \
    -keyout ca-key.pem -out ca.pem -subj "/CN=nanoplane CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"

# issue NAME COMMON_NAME EXTENSIONS: a key and a certificate signed by the CA
issue() {
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$1-key.pem" -out "$1.csr" -subj "/CN=$2"
    printf '%s\n' "$3" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days "$days" \
        -extfile "$1.ext" -out "$1.pem"
    rm -f "$1.csr" "$1.ext"
}

issue controlplane nanoplane-controlplane "basicConstraints=critical,CA:FALSE
extendedKeyUsage=serverAuth
subjectAltName=$cp_sans"
issue dataplane nanoplane-dataplane "basicConstraints=critical,CA:FALSE
extendedKeyUsage=serverAuth
subjectAltName=$dp_sans"
issue controlplane-client nanoplane-controlplane "basicConstraints=critical,CA:FALSE
extendedKeyUsage=clientAuth"

chmod 644 ca.pem controlplane.pem dataplane.pem controlplane-client.pem
rm -f ca.srl
echo "certificates in $(pwd):"
ls -1 ./*.pem
