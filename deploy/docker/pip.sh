#!/bin/sh
# pip for the build stages only (never copied into a final stage).
#
# Behind a TLS-intercepting proxy pip fails with "self-signed certificate in certificate chain" unless it trusts the
# proxy's CA. Such a CA can be put in the build context as deploy/certs/extra-ca.crt (git-ignored); it is appended
# to the image's own bundle and handed to pip as PIP_CERT. Without the file pip runs unchanged. The classic builder
# has no `RUN --mount=type=secret`, so a file from the context is the portable way; it stays in the build stage.
set -eu

EXTRA_CA=/tmp/build/certs/extra-ca.crt
if [ -s "$EXTRA_CA" ]; then
    bundle=/tmp/build/ca-bundle.pem
    if [ ! -s "$bundle" ]; then
        # The image's bundle first (may be absent on a bare base), then the extra CA.
        cat /etc/ssl/certs/ca-certificates.crt "$EXTRA_CA" > "$bundle" 2>/dev/null || cp "$EXTRA_CA" "$bundle"
    fi
    export PIP_CERT="$bundle"
fi
exec /opt/venv/bin/python -m pip "$@"
