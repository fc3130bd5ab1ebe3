#!/usr/bin/env bash
# Builds the container images of mailcluster (node/Containerfile, operator/Containerfile: static
# musl binaries FROM scratch) with buildah, which needs no daemon, or with docker. The same
# Containerfiles and context serve both, so the images that the real-pod tests run are the
# images that kind-config/e2e.sh and users ship.
#
# Usage: images/build.sh [--tag TAG] [--repository PREFIX] [--bin-dir DIR] [--release]
#                        [--builder buildah|docker] [--out DIR]
#        images/build.sh --one NAME CONTAINERFILE CONTEXT [--builder ...] [--out DIR]
#   --tag         image tag (default: the workspace version)
#   --repository  image name prefix (default ghcr.io/mailcluster): PREFIX/mailnode:TAG and
#                 PREFIX/mailcluster-operator:TAG
#   --bin-dir     directory with the static mailnode and mailcluster-operator binaries; without
#                 it they are built here with cargo (x86_64-unknown-linux-musl, debug unless
#                 --release), or use images/binaries.Containerfile where there is no Rust
#   --out         also write each image as a docker-archive tar into DIR (for `ctr images import`
#                 or `kind load image-archive`)
#   --one         build one image NAME from CONTAINERFILE and CONTEXT (the test cluster's own)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

tag="" repository=ghcr.io/mailcluster bin_dir="" profile=debug builder=buildah out="" one=()
while [ $# -gt 0 ]; do
  case $1 in
    --tag) tag=$2; shift 2 ;;
    --repository) repository=$2; shift 2 ;;
    --bin-dir) bin_dir=$2; shift 2 ;;
    --release) profile=release; shift ;;
    --builder) builder=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --one) one=("$2" "$3" "$4"); shift 4 ;;
    *) sed -n '2,21p' "$0" >&2; exit 2 ;;
  esac
done
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n 1)
tag=${tag:-$version}
command -v "$builder" >/dev/null || { echo "images/build.sh: $builder is not installed" >&2; exit 1; }

work=$(mktemp -d -t mailcluster-images.XXXXXX)
cleanup() {
  # buildah's storage for this run only: FROM scratch images cost nothing to rebuild.
  rm -rf "$work"
}
trap cleanup EXIT
buildah_opts=(--root "$work/storage" --runroot "$work/run" --storage-driver vfs)

build_one() { # NAME CONTAINERFILE CONTEXT
  local name=$1 file=$2 ctx=$3
  case $builder in
    buildah)
      buildah "${buildah_opts[@]}" bud --quiet --build-arg "VERSION=$version" \
        -f "$file" -t "$name" "$ctx" >/dev/null
      if [ -n "$out" ]; then
        local archive
        archive="$out/$(basename "${name%%:*}").tar"
        rm -f "$archive"
        buildah "${buildah_opts[@]}" push --quiet "$name" "docker-archive:$archive:$name"
      fi
      ;;
    docker)
      docker build --build-arg "VERSION=$version" -f "$file" -t "$name" "$ctx"
      [ -z "$out" ] || docker save -o "$out/$(basename "${name%%:*}").tar" "$name"
      ;;
    *) echo "images/build.sh: unknown builder $builder" >&2; exit 2 ;;
  esac
  echo "$name"
}

[ -z "$out" ] || mkdir -p "$out"
if [ ${#one[@]} -gt 0 ]; then
  build_one "${one[@]}"
  exit 0
fi

if [ -z "$bin_dir" ]; then
  release=()
  [ "$profile" = release ] && release=(--release)
  (cd "$root" && cargo build --locked "${release[@]}" --target x86_64-unknown-linux-musl \
    -p mailnode -p mailcluster-operator --bins)
  bin_dir=${CARGO_TARGET_DIR:-$root/target}/x86_64-unknown-linux-musl/$profile
fi

# What a distroless static base gives: CA certificates, a passwd and group with the non-root
# user (65532, "nonroot"), and a writable /tmp.
rootfs=$work/rootfs
mkdir -p "$rootfs/etc/ssl/certs" "$rootfs/tmp" "$rootfs/home/nonroot"
chmod 1777 "$rootfs/tmp"
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
  >"$rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$rootfs/etc/group"

for component in node:mailnode operator:mailcluster-operator; do
  dir=${component%%:*} binary=${component#*:}
  ctx=$work/ctx-$binary
  mkdir -p "$ctx"
  cp -a "$rootfs" "$ctx/rootfs"
  cp "$bin_dir/$binary" "$ctx/$binary"
  if ldd "$ctx/$binary" 2>&1 | grep -q '=>'; then
    echo "images/build.sh: $bin_dir/$binary is not a static binary" >&2
    exit 1
  fi
  build_one "$repository/$binary:$tag" "$root/$dir/Containerfile" "$ctx"
done
