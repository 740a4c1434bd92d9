#!/usr/bin/env bash
# Builds libcalibrl and installs it as a C/C++ package under a prefix:
#
#   scripts/install.sh --prefix /opt/calibrl        (default prefix: /usr/local)
#
#   PREFIX/lib/libcalibrl.so.VERSION (SONAME libcalibrl.so.MAJOR), the symlinks
#       libcalibrl.so.MAJOR -> libcalibrl.so.VERSION and libcalibrl.so -> libcalibrl.so.MAJOR,
#   PREFIX/lib/libcalibrl.a
#   PREFIX/include/calibrl.h (C ABI), PREFIX/include/calibrl.hpp (C++17 wrapper) and the
#       parts it includes, PREFIX/include/calibrl/*.hpp
#   PREFIX/lib/cmake/calibrl/calibrlConfig.cmake, calibrlConfigVersion.cmake
#       find_package(calibrl CONFIG REQUIRED) -> imported targets calibrl::calibrl (shared)
#       and calibrl::calibrl_static
#   PREFIX/lib/pkgconfig/calibrl.pc          pkg-config --cflags --libs calibrl
#
# Options: --no-build (install what target/release holds), --libdir NAME (default: lib).
# The installed tree is relocatable: the CMake config finds its files relative to itself.
set -euo pipefail

prefix=/usr/local
libdir_name=lib
build=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --prefix) prefix="$2"; shift 2 ;;
    --prefix=*) prefix="${1#--prefix=}"; shift ;;
    --libdir) libdir_name="$2"; shift 2 ;;
    --no-build) build=0; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target_dir="${CARGO_TARGET_DIR:-$root/target}/release"
version="$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$root/Cargo.toml" | head -n1)"
abi_version="$(sed -n 's/^#define CALIBRL_ABI_VERSION \([0-9]*\).*/\1/p' "$root/include/calibrl.h")"
[[ -n "$version" && -n "$abi_version" ]] || { echo "install.sh: cannot read versions" >&2; exit 1; }
# The SONAME build.rs gives the library: programs record libcalibrl.so.MAJOR.
soname="libcalibrl.so.${version%%.*}"
realname="libcalibrl.so.$version"

if [[ $build -eq 1 ]]; then
  (cd "$root" && cargo build --release --lib)
fi
for f in libcalibrl.so libcalibrl.a; do
  [[ -f "$target_dir/$f" ]] || { echo "install.sh: $target_dir/$f missing (build first)" >&2; exit 1; }
done

mkdir -p "$prefix"
prefix="$(cd "$prefix" && pwd)"
lib="$prefix/$libdir_name"
inc="$prefix/include"
cmakedir="$lib/cmake/calibrl"
pcdir="$lib/pkgconfig"
mkdir -p "$lib" "$inc" "$cmakedir" "$pcdir"

got_soname="$(readelf -d "$target_dir/libcalibrl.so" 2>/dev/null | sed -n 's/.*Library soname: \[\(.*\)\].*/\1/p')"
if command -v readelf >/dev/null && [[ "$got_soname" != "$soname" ]]; then
  echo "install.sh: $target_dir/libcalibrl.so has SONAME '$got_soname', expected $soname (rebuild)" >&2
  exit 1
fi
rm -f "$lib/libcalibrl.so" "$lib/$soname"
install -m 0755 "$target_dir/libcalibrl.so" "$lib/$realname"
ln -s "$realname" "$lib/$soname"
ln -s "$soname" "$lib/libcalibrl.so"
install -m 0644 "$target_dir/libcalibrl.a" "$lib/libcalibrl.a"
install -m 0644 "$root/include/calibrl.h" "$inc/calibrl.h"
install -m 0644 "$root/bindings/cpp/include/calibrl.hpp" "$inc/calibrl.hpp"
# calibrl.hpp includes its parts from calibrl/ next to it; a stale part from an older install
# is removed with the directory.
rm -rf "$inc/calibrl"
mkdir -p "$inc/calibrl"
cmake_parts=""
for part in "$root"/bindings/cpp/include/calibrl/*.hpp; do
  install -m 0644 "$part" "$inc/calibrl/$(basename "$part")"
  cmake_parts+=" \"include/calibrl/$(basename "$part")\""
done

# Native libraries a Rust staticlib needs on Linux (rustc --print native-static-libs).
static_deps="-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"

# The path from the config directory back to the prefix ("lib/cmake/calibrl" -> ../../..).
up="$(echo "$libdir_name/cmake/calibrl" | sed 's#[^/][^/]*#..#g')"

cat > "$cmakedir/calibrlConfig.cmake" <<EOF
# CMake package config of calibrl $version (C ABI $abi_version), written by scripts/install.sh.
#   find_package(calibrl CONFIG REQUIRED)
#   target_link_libraries(app PRIVATE calibrl::calibrl)          # libcalibrl.so
#   target_link_libraries(app PRIVATE calibrl::calibrl_static)   # libcalibrl.a
# Headers: <calibrl.h> (C) and <calibrl.hpp> (C++17, header-only wrapper).
get_filename_component(_calibrl_prefix "\${CMAKE_CURRENT_LIST_DIR}/$up" ABSOLUTE)

set(calibrl_VERSION "$version")
set(calibrl_ABI_VERSION $abi_version)
set(calibrl_INCLUDE_DIRS "\${_calibrl_prefix}/include")
set(calibrl_LIBRARIES calibrl::calibrl)

if(NOT TARGET calibrl::calibrl)
  add_library(calibrl::calibrl SHARED IMPORTED)
  set_target_properties(calibrl::calibrl PROPERTIES
    IMPORTED_LOCATION "\${_calibrl_prefix}/$libdir_name/$realname"
    IMPORTED_SONAME "$soname"
    INTERFACE_INCLUDE_DIRECTORIES "\${_calibrl_prefix}/include")
endif()

if(NOT TARGET calibrl::calibrl_static)
  add_library(calibrl::calibrl_static STATIC IMPORTED)
  set_target_properties(calibrl::calibrl_static PROPERTIES
    IMPORTED_LOCATION "\${_calibrl_prefix}/$libdir_name/libcalibrl.a"
    IMPORTED_LINK_INTERFACE_LANGUAGES "C"
    INTERFACE_INCLUDE_DIRECTORIES "\${_calibrl_prefix}/include"
    INTERFACE_LINK_LIBRARIES "gcc_s;util;rt;pthread;m;dl")
endif()

foreach(_calibrl_f "$libdir_name/$realname" "$libdir_name/$soname" "include/calibrl.h" "include/calibrl.hpp"$cmake_parts)
  if(NOT EXISTS "\${_calibrl_prefix}/\${_calibrl_f}")
    set(calibrl_FOUND FALSE)
    set(calibrl_NOT_FOUND_MESSAGE "calibrl: \${_calibrl_prefix}/\${_calibrl_f} is missing")
  endif()
endforeach()
unset(_calibrl_f)
unset(_calibrl_prefix)
EOF

cat > "$cmakedir/calibrlConfigVersion.cmake" <<EOF
# Version check of calibrl $version: 0.x releases are compatible within one minor version,
# later ones within one major version.
set(PACKAGE_VERSION "$version")
if(PACKAGE_FIND_VERSION VERSION_GREATER PACKAGE_VERSION)
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
else()
  string(REGEX MATCH "^([0-9]+)\\\\.([0-9]+)" _calibrl_mm "\${PACKAGE_VERSION}")
  set(_calibrl_major "\${CMAKE_MATCH_1}")
  set(_calibrl_minor "\${CMAKE_MATCH_2}")
  if(PACKAGE_FIND_VERSION_MAJOR STREQUAL _calibrl_major AND
     (NOT _calibrl_major STREQUAL "0" OR PACKAGE_FIND_VERSION_MINOR STREQUAL _calibrl_minor))
    set(PACKAGE_VERSION_COMPATIBLE TRUE)
  else()
    set(PACKAGE_VERSION_COMPATIBLE FALSE)
  endif()
  if(PACKAGE_FIND_VERSION STREQUAL PACKAGE_VERSION)
    set(PACKAGE_VERSION_EXACT TRUE)
  endif()
endif()
if(CMAKE_SIZEOF_VOID_P AND NOT CMAKE_SIZEOF_VOID_P EQUAL 8)
  set(PACKAGE_VERSION "\${PACKAGE_VERSION} (64-bit)")
  set(PACKAGE_VERSION_UNSUITABLE TRUE)
endif()
EOF

cat > "$pcdir/calibrl.pc" <<EOF
prefix=$prefix
libdir=\${prefix}/$libdir_name
includedir=\${prefix}/include

Name: calibrl
Description: CalibRL hybrid-policy RL loss: C ABI (calibrl.h) and C++17 wrapper (calibrl.hpp)
Version: $version
Libs: -L\${libdir} -lcalibrl
Libs.private: $static_deps
Cflags: -I\${includedir}
EOF

echo "installed calibrl $version (ABI $abi_version) under $prefix"
echo "  CMake:      -DCMAKE_PREFIX_PATH=$prefix   then find_package(calibrl CONFIG REQUIRED)"
echo "  pkg-config: PKG_CONFIG_PATH=$pcdir pkg-config --cflags --libs calibrl"
