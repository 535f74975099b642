#!/usr/bin/env bash
# Makes Mooncake Store usable as a peer in the benchmarks (benchmarks/mooncake_peer.py):
#
#   benchmarks/mooncake_setup.sh [VENV]        # VENV defaults to the repo's .venv
#
# 1. installs the pinned PyPI packages into VENV: mooncake-transfer-engine-non-cuda (brings
#    mooncake_master, mooncake_client and mooncake/store.so) and nvidia-cuda-runtime-cu12
#    (those binaries link libcudart.so.12 even in the non-CUDA build; no GPU is needed);
# 2. builds LMCache's native `lmcache.lmcache_mooncake` module, which the `mooncake_store` L2
#    adapter imports but LMCache 0.5.6's wheel does not ship: lmcache 0.5.6 sdist's
#    csrc/storage_backends/mooncake/{pybind,connector}.cpp compiled against the Mooncake
#    v0.3.12.post1 headers (+ its extern/yalantinglibs submodule) and linked to the wheel's
#    mooncake/store.so, then copied into VENV's lmcache package dir (what an sdist build does);
# 3. checks that `import lmcache.lmcache_mooncake` works and that mooncake_master starts.
#
# Sources (downloads and build products go to .mooncake/, gitignored; CI and `make test` never
# need any of this):
#   - lmcache 0.5.6 sdist: from PyPI (sha256 checked).
#   - Mooncake: `git clone` of github.com/kvcache-ai/Mooncake at v0.3.12.post1, unless
#     MOONCAKE_SRC names a local git repository (a checkout or a bare mirror holding the tag) or
#     an already extracted source tree of that version.
#   - yalantinglibs: the commit Mooncake's extern/yalantinglibs submodule pins, fetched from
#     github.com/alibaba/yalantinglibs, unless YLT_SRC names a local git repository (checkout
#     or bare mirror holding that commit) or a source tree. With MOONCAKE_SRC a checkout whose
#     submodule is populated, that is used.
#   e.g. MOONCAKE_SRC=/work/.mirror/kvcache-ai+Mooncake/repo YLT_SRC=/work/.mirror/alibaba+yalantinglibs/repo
# System headers come from Debian/Ubuntu packages (installed with apt-get when run as root,
# else the script says which to install). FORCE=1 rebuilds the module.
set -euo pipefail

MOONCAKE_PKG="mooncake-transfer-engine-non-cuda==0.3.12.post1"
CUDART_PKG="nvidia-cuda-runtime-cu12==12.8.90"
PYBIND11_PKG="pybind11==3.1.0"
LMCACHE_VERSION="0.5.6"
LMCACHE_SDIST_SHA256="d6951e60ce8818a76aa42d0866a4ba85f1c95cd919355fff30ff24dcc3243f1e"
MOONCAKE_TAG="v0.3.12.post1"
# extern/yalantinglibs at Mooncake v0.3.12.post1 (checked against the tree when it is in git).
YLT_COMMIT="6a0e067d9a43492cf8e4e280b531924fbd724dbd"
MOONCAKE_URL="${MOONCAKE_URL:-https://github.com/kvcache-ai/Mooncake.git}"
YLT_URL="${YLT_URL:-https://github.com/alibaba/yalantinglibs.git}"
APT_PKGS=(g++ libboost-dev libgflags-dev libgoogle-glog-dev libibverbs-dev libjsoncpp-dev libmsgpack-dev libnuma-dev)

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(realpath -m "${1:-$REPO/.venv}")"
WORK="${MOONCAKE_WORK:-$REPO/.mooncake}"
PY="$VENV/bin/python"

say() { printf '[mooncake-setup] %s\n' "$*"; }
die() { printf '[mooncake-setup] ERROR: %s\n' "$*" >&2; exit 1; }

[ -x "$PY" ] || die "no Python at $PY: create the venv first (make .venv/.installed) or pass its path"
"$PY" -c 'import lmcache' 2>/dev/null || die "lmcache is not installed in $VENV"
have_lmcache="$("$PY" -c 'import importlib.metadata as m; print(m.version("lmcache"))')"
[ "$have_lmcache" = "$LMCACHE_VERSION" ] || die "$VENV has lmcache $have_lmcache; this build is for $LMCACHE_VERSION"
mkdir -p "$WORK"

# --- 1. PyPI packages -----------------------------------------------------------------------
say "installing $MOONCAKE_PKG and $CUDART_PKG into $VENV"
"$PY" -m pip install -q "$MOONCAKE_PKG" "$CUDART_PKG"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
EXT="$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
PYINC="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
for f in "$SITE/mooncake/store.so" "$SITE/mooncake/mooncake_master" "$SITE/mooncake/mooncake_client" \
         "$SITE/nvidia/cuda_runtime/lib/libcudart.so.12"; do
  [ -e "$f" ] || die "expected $f after the pip install"
done
[ -f "$PYINC/Python.h" ] || die "no Python.h under $PYINC (install the Python development headers)"
if [ ! -d "$WORK/pybind11/pybind11/include" ]; then
  say "fetching $PYBIND11_PKG headers into $WORK/pybind11 (not into the venv)"
  "$PY" -m pip install -q --target "$WORK/pybind11" "$PYBIND11_PKG"
fi

# --- system headers ------------------------------------------------------------------------
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "apt-get install ${missing[*]}"
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
      || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; } \
      || die "apt-get install ${missing[*]} failed"
  else
    die "missing build packages; run: sudo apt-get install ${missing[*]}"
  fi
fi

# --- 2. sources ----------------------------------------------------------------------------
# lmcache sdist
LMSRC="$WORK/src/lmcache-$LMCACHE_VERSION"
if [ ! -f "$LMSRC/csrc/storage_backends/mooncake/connector.cpp" ]; then
  tarball="$WORK/lmcache-$LMCACHE_VERSION.tar.gz"
  if [ ! -f "$tarball" ] || ! echo "$LMCACHE_SDIST_SHA256  $tarball" | sha256sum -c --quiet - 2>/dev/null; then
    # PyPI's simple index (PEP 503) lists the sdist with its sha256; the hash is checked below.
    url="$(curl -fsSL --retry 3 https://pypi.org/simple/lmcache/ \
      | grep -o "href=\"[^\"]*/lmcache-$LMCACHE_VERSION\.tar\.gz[^\"]*\"" | head -1 \
      | sed -e 's/^href="//' -e 's/[#"].*$//')" || true
    [ -n "$url" ] || die "cannot find the lmcache $LMCACHE_VERSION sdist in https://pypi.org/simple/lmcache/"
    say "downloading $url"
    curl -fsSL --retry 3 -o "$tarball.part" "$url" || die "download of $url failed"
    mv "$tarball.part" "$tarball"
  fi
  echo "$LMCACHE_SDIST_SHA256  $tarball" | sha256sum -c --quiet - || die "sha256 mismatch for $tarball"
  mkdir -p "$WORK/src"
  tar -xzf "$tarball" -C "$WORK/src"
fi

# git_dir PATH: prints the git directory of PATH (checkout or bare repository), or fails.
git_dir() { git -C "$1" rev-parse --absolute-git-dir 2>/dev/null; }

# Mooncake headers: only the include trees the connector needs, from a pinned revision.
MCSRC="$WORK/src/mooncake-$MOONCAKE_TAG"
MC_PATHS=(mooncake-store/include mooncake-transfer-engine/include)
if [ ! -f "$MCSRC/mooncake-store/include/real_client.h" ]; then
  rm -rf "$MCSRC.part" && mkdir -p "$MCSRC.part"
  if [ -n "${MOONCAKE_SRC:-}" ] && gd="$(git_dir "$MOONCAKE_SRC")"; then
    say "Mooncake $MOONCAKE_TAG headers from $MOONCAKE_SRC"
    git --git-dir="$gd" rev-parse -q --verify "$MOONCAKE_TAG^{commit}" >/dev/null \
      || die "$MOONCAKE_SRC has no tag $MOONCAKE_TAG"
    # (A partial mirror may print "invalid object" for big files outside these paths: harmless.)
    git --git-dir="$gd" archive "$MOONCAKE_TAG" "${MC_PATHS[@]}" | tar -x -C "$MCSRC.part"
    pinned="$(git --git-dir="$gd" ls-tree "$MOONCAKE_TAG" extern/yalantinglibs | awk '{print $3}')"
    [ "$pinned" = "$YLT_COMMIT" ] || die "Mooncake $MOONCAKE_TAG pins yalantinglibs $pinned, script expects $YLT_COMMIT"
  elif [ -n "${MOONCAKE_SRC:-}" ]; then
    [ -f "$MOONCAKE_SRC/mooncake-store/include/real_client.h" ] || die "MOONCAKE_SRC=$MOONCAKE_SRC is neither a git repository nor a Mooncake source tree"
    say "Mooncake headers from the source tree $MOONCAKE_SRC (its version is not checked: it must be $MOONCAKE_TAG)"
    for p in "${MC_PATHS[@]}"; do mkdir -p "$MCSRC.part/$(dirname "$p")"; cp -r "$MOONCAKE_SRC/$p" "$MCSRC.part/$p"; done
  else
    say "cloning $MOONCAKE_URL at $MOONCAKE_TAG"
    rm -rf "$WORK/src/mooncake.git"
    git clone -q --depth 1 --branch "$MOONCAKE_TAG" --no-checkout "$MOONCAKE_URL" "$WORK/src/mooncake.git" \
      || die "git clone $MOONCAKE_URL failed (no GitHub access? set MOONCAKE_SRC to a local repository)"
    git --git-dir="$WORK/src/mooncake.git/.git" archive "$MOONCAKE_TAG" "${MC_PATHS[@]}" | tar -x -C "$MCSRC.part"
    rm -rf "$WORK/src/mooncake.git"
  fi
  [ -f "$MCSRC.part/mooncake-store/include/real_client.h" ] || die "Mooncake headers incomplete in $MCSRC.part"
  mv "$MCSRC.part" "$MCSRC"
fi

YLTSRC="$WORK/src/yalantinglibs-$YLT_COMMIT"
if [ ! -d "$YLTSRC/include/ylt" ]; then
  rm -rf "$YLTSRC.part" && mkdir -p "$YLTSRC.part"
  if [ -z "${YLT_SRC:-}" ] && [ -n "${MOONCAKE_SRC:-}" ] && [ -d "$MOONCAKE_SRC/extern/yalantinglibs/include/ylt" ]; then
    YLT_SRC="$MOONCAKE_SRC/extern/yalantinglibs"
  fi
  if [ -n "${YLT_SRC:-}" ] && gd="$(git_dir "$YLT_SRC")" && [ "$gd" != "$(git_dir "${MOONCAKE_SRC:-/nonexistent}" || true)" ]; then
    say "yalantinglibs $YLT_COMMIT from $YLT_SRC"
    git --git-dir="$gd" cat-file -e "$YLT_COMMIT^{commit}" 2>/dev/null \
      || die "$YLT_SRC lacks commit $YLT_COMMIT (the one Mooncake $MOONCAKE_TAG pins)"
    git --git-dir="$gd" archive "$YLT_COMMIT" include | tar -x -C "$YLTSRC.part"
  elif [ -n "${YLT_SRC:-}" ]; then
    [ -d "$YLT_SRC/include/ylt" ] || die "YLT_SRC=$YLT_SRC is neither a git repository nor a yalantinglibs source tree"
    say "yalantinglibs from the source tree $YLT_SRC (its version is not checked: it must be $YLT_COMMIT)"
    cp -r "$YLT_SRC/include" "$YLTSRC.part/include"
  else
    say "fetching $YLT_URL at $YLT_COMMIT"
    tmpgit="$WORK/src/ylt.git"
    rm -rf "$tmpgit" && git init -q --bare "$tmpgit"
    git --git-dir="$tmpgit" fetch -q --depth 1 "$YLT_URL" "$YLT_COMMIT" \
      || die "git fetch $YLT_URL $YLT_COMMIT failed (no GitHub access? set YLT_SRC to a local repository)"
    git --git-dir="$tmpgit" archive "$YLT_COMMIT" include | tar -x -C "$YLTSRC.part"
    rm -rf "$tmpgit"
  fi
  [ -f "$YLTSRC.part/include/ylt/coro_rpc/coro_rpc_client.hpp" ] || die "yalantinglibs headers incomplete in $YLTSRC.part"
  mv "$YLTSRC.part" "$YLTSRC"
fi

# --- 3. build ------------------------------------------------------------------------------
TARGET="$SITE/lmcache/lmcache_mooncake$EXT"
BUILD="$WORK/build"
CS="$LMSRC/csrc/storage_backends"
MI="$MCSRC/mooncake-store/include"
# As LMCache's setup_extensions/storage_backend_profiles/mooncake.py: C++20, -DYLT_ENABLE_IBV
# (store.so is built with it, and the headers' types must match). The include list is
# mooncake-store's CMake include_directories plus yalantinglibs' three roots.
CXXFLAGS=(-std=c++20 -O2 -fPIC -DYLT_ENABLE_IBV -w
  -I"$CS" -I"$CS/mooncake"
  -I"$MI/cachelib_memory_allocator/include" -I"$MI/cachelib_memory_allocator/fake_include"
  -I"$MI/cachelib_memory_allocator" -I"$MI" -I"$MCSRC/mooncake-transfer-engine/include"
  -I"$YLTSRC/include" -I"$YLTSRC/include/ylt/thirdparty" -I"$YLTSRC/include/ylt/standalone"
  -I"$WORK/pybind11/pybind11/include" -I"$PYINC")
# DT_RPATH (not RUNPATH) so store.so's own libcudart.so.12 dependency is found through this
# module's path too: importing the module then needs no LD_LIBRARY_PATH.
LDFLAGS=(-shared -L"$SITE/mooncake" -l:store.so
  '-Wl,--disable-new-dtags,-rpath,$ORIGIN/../mooncake:$ORIGIN/../nvidia/cuda_runtime/lib')
stamp="$(printf '%s\n' "$LMCACHE_SDIST_SHA256" "$MOONCAKE_TAG" "$YLT_COMMIT" "$PYBIND11_PKG" "$MOONCAKE_PKG" "$EXT" "${CXXFLAGS[*]}" "${LDFLAGS[*]}" | sha256sum | cut -c1-16)"
if [ "${FORCE:-0}" != 1 ] && [ -f "$TARGET" ] && [ "$(cat "$BUILD/stamp" 2>/dev/null)" = "$stamp" ] \
   && cmp -s "$TARGET" "$BUILD/lmcache_mooncake$EXT"; then
  say "lmcache_mooncake is up to date ($TARGET)"
else
  say "compiling lmcache_mooncake (C++20; a minute or two)"
  rm -rf "$BUILD" && mkdir -p "$BUILD"
  pids=()
  for f in pybind connector; do
    g++ "${CXXFLAGS[@]}" -c "$CS/mooncake/$f.cpp" -o "$BUILD/$f.o" 2>"$BUILD/$f.log" & pids+=($!)
  done
  for i in 0 1; do
    f=$([ $i = 0 ] && echo pybind || echo connector)
    wait "${pids[$i]}" || { tail -30 "$BUILD/$f.log" >&2; die "compiling $CS/mooncake/$f.cpp failed (log: $BUILD/$f.log)"; }
  done
  g++ "$BUILD/pybind.o" "$BUILD/connector.o" -o "$BUILD/lmcache_mooncake$EXT" "${LDFLAGS[@]}" \
    || die "linking lmcache_mooncake against $SITE/mooncake/store.so failed"
  install -m 0755 "$BUILD/lmcache_mooncake$EXT" "$TARGET"
  echo "$stamp" > "$BUILD/stamp"
  say "installed $TARGET"
fi

# --- 4. check ------------------------------------------------------------------------------
LMCACHE_TRACK_USAGE=false LMCACHE_DISABLE_BANNER=1 "$PY" -c '
import lmcache.lmcache_mooncake as m
assert hasattr(m, "LMCacheMooncakeClient"), "LMCacheMooncakeClient missing"
print("[mooncake-setup] import lmcache.lmcache_mooncake: OK", m.__file__)
' 2>&1 | grep -F '[mooncake-setup]' || die "import lmcache.lmcache_mooncake failed: run '$PY -c \"import lmcache.lmcache_mooncake\"' to see why"
LD_LIBRARY_PATH="$SITE/nvidia/cuda_runtime/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  "$SITE/mooncake/mooncake_master" --version >/dev/null 2>&1 || die "mooncake_master does not run (libraries?)"
say "ready: mooncake_master and mooncake_client in $SITE/mooncake; use benchmarks/mooncake_peer.py"
