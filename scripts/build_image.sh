#!/usr/bin/env bash
# Build, tag and (optionally) push the component image, then write its tag into a profile.
#
#   scripts/build_image.sh --tag registry.example.com/flywheel:0.1.0 [--variant cpu|cuda] [--push] [--profile configs/cluster.yaml] [-- BUILD OPTIONS]
#
# ENGINE (default docker; podman works the same) builds it; options after `--` go to its build
# command as they are (`make image` passes a local base and its pip settings that way).
# The profile's kfp.image is what `flywheel compile` bakes into every component; writing
# it here keeps the image that was built and the image the pipeline names the same.
set -euo pipefail
cd "$(dirname "$0")/.."
variant=cpu push=0 tag="" profile=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag=$2; shift 2 ;;
    --variant) variant=$2; shift 2 ;;
    --push) push=1; shift ;;
    --profile) profile=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    --) shift; break ;;
    *) echo "build_image.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
[ -n "$tag" ] || { echo "build_image.sh: --tag is required" >&2; exit 2; }
case "$variant" in cpu|cuda) ;; *) echo "build_image.sh: --variant must be cpu or cuda" >&2; exit 2 ;; esac

engine=${ENGINE:-docker}
"$engine" build -f containers/Dockerfile --build-arg VARIANT="$variant" -t "$tag" "$@" .
if [ "$push" = 1 ]; then "$engine" push "$tag"; fi

if [ -n "$profile" ]; then
  python3 - "$profile" "$tag" <<'PY'
import re, sys
path, tag = sys.argv[1], sys.argv[2]
text = open(path).read()
if re.search(r"^  image:.*$", text, flags=re.M):
    text = re.sub(r"^  image:.*$", f"  image: {tag}", text, count=1, flags=re.M)
elif re.search(r"^kfp:\s*$", text, flags=re.M):
    text = re.sub(r"^kfp:\s*$", f"kfp:\n  image: {tag}", text, count=1, flags=re.M)
else:
    text = text.rstrip("\n") + f"\n\nkfp:\n  image: {tag}\n"
open(path, "w").write(text)
print(f"wrote kfp.image={tag} into {path}")
PY
fi
