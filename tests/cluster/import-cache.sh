#!/usr/bin/env bash
# A pyxis importer (pyxis.conf importer=...) that imports each image once and shares the file:
#   import-cache get URI   prints the path of a squashfs file of URI, importing it if needed
#   import-cache release   nothing to do: cached files stay for the next step
# The key is the image's ID (dockerd://) or digest (docker://): a rebuilt tag is imported
# again, and its file replaces the one of the image the name had before. One lock serialises
# imports: steps on several nodes of one host (or of one shared disk) would otherwise import
# the same image side by side and trip over each other's files.
# pyxis runs this with a cleared environment (slurmstepd's PATH at most): the system's
# directories follow whatever PATH it has.
set -euo pipefail
export PATH=${PATH:+$PATH:}/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

cache=${IMPORT_CACHE_DIR:-$(dirname "$(readlink -f "$0")")/images}
case "${1:-}" in
  get)
    uri=${2:?usage: import-cache get URI}
    case "$uri" in
      dockerd://*) key=$(docker image inspect --format '{{.Id}}' "${uri#dockerd://}") ;;
      *) key=$(enroot digest "$uri") ;;
    esac
    [ -n "$key" ] || { echo "import-cache: no ID for $uri" >&2; exit 1; }
    file="$cache/${key//[:\/]/-}.sqsh"
    mkdir -p "$cache"
    exec 9>"$cache/.lock"
    flock 9
    if [ ! -s "$file" ]; then
      echo "import-cache: importing $uri once into $file" >&2
      rm -f "$file.part"
      trap 'rm -f "$file.part"' EXIT # an import that fails leaves no half-written GBs
      enroot import --output "$file.part" "$uri" >&2
      # The files of earlier images with this name go (GBs each); a step still running from
      # one keeps its open file until it ends. A loop, not grep over a glob: with no earlier
      # image (an empty cache) the glob matches nothing, and grep's status would end the
      # script under `set -e` after the import.
      for old in "$cache"/*.uri; do
        [ -f "$old" ] && [ "$(cat "$old")" = "$uri" ] || continue
        rm -f "${old%.uri}" "$old"
      done
      mv "$file.part" "$file"
      echo "$uri" >"$file.uri"
    fi
    echo "$file"
    ;;
  release) ;;
  *) echo "usage: import-cache get URI | import-cache release" >&2; exit 1 ;;
esac
