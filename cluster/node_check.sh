#!/usr/bin/env bash
# Network check, the first of aws.yaml's setup_commands on every node: does this node reach
# what its setup and the run need? A missing NAT route or S3 endpoint then fails the node's
# setup in seconds, with one line naming the missing piece, instead of a pip or S3 timeout
# minutes later (cluster/README.md, "Network").
#
#   bash cluster/node_check.sh             the internet (uv, Python, PyPI) and the region's S3
#   bash cluster/node_check.sh --offline   S3 only: an AMI with the environment baked in
#
# Any HTTP answer counts as reachable; only a connection that fails or times out does not.
# NODE_CHECK_INTERNET (space-separated URLs), NODE_CHECK_S3 (a URL) and NODE_CHECK_TIMEOUT
# (seconds) replace the defaults.
set -u

offline=0
case "${1:-}" in
    --offline) offline=1 ;;
    "") ;;
    *) echo "usage: node_check.sh [--offline]" >&2; exit 2 ;;
esac
timeout=${NODE_CHECK_TIMEOUT:-15}

reachable() { curl -sS -o /dev/null --connect-timeout "$timeout" --max-time "$((2 * timeout))" "$1" 2>/dev/null; }

if [ "$offline" = 0 ]; then
    # Where setup_commands fetch from: the uv installer, uv's Python builds (GitHub), PyPI.
    for url in ${NODE_CHECK_INTERNET:-https://astral.sh https://github.com https://pypi.org/simple/}; do
        if ! reachable "$url"; then
            echo "node_check: $(hostname) cannot reach $url: the nodes' subnet needs a default route to a NAT gateway" \
                 "(or an AMI with the environment baked in and node_check.sh --offline); cluster/README.md, Network" >&2
            exit 1
        fi
    done
fi

s3=${NODE_CHECK_S3:-}
if [ -z "$s3" ]; then
    # The instance's region from the metadata service (IMDSv2), for the region's S3 endpoint.
    token=$(curl -sS -X PUT --max-time 5 -H "X-aws-ec2-metadata-token-ttl-seconds: 60" \
            http://169.254.169.254/latest/api/token 2>/dev/null)
    region=$(curl -sS --max-time 5 -H "X-aws-ec2-metadata-token: $token" \
             http://169.254.169.254/latest/meta-data/placement/region 2>/dev/null)
    if [ -z "$region" ]; then
        echo "node_check: $(hostname) has no EC2 instance metadata (region unknown): set NODE_CHECK_S3 to the S3 endpoint" >&2
        exit 1
    fi
    s3="https://s3.$region.amazonaws.com"
fi
if ! reachable "$s3"; then
    echo "node_check: $(hostname) cannot reach S3 at $s3: add an S3 gateway VPC endpoint to the route table of the" \
         "nodes' subnet (the bucket must be in this region); cluster/README.md, Network" >&2
    exit 1
fi
echo "node_check: $(hostname) reaches $([ "$offline" = 0 ] && echo "the internet and ")S3 ($s3)"
