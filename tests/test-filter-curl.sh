#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# test-filter-curl.sh - a cloud image over HTTP: the filter, read-only,
# over nbdkit's curl plugin, reading from a real web server (nginx, from
# Debian) that the test starts on a loopback port and that serves byte
# ranges (Python's http.server does not).
#
#  1. A small cloud-style disk (GPT, one ext4 partition filled by
#     mkfs.ext4 -d: /etc/services, a text file, 3 MiB of random data) is
#     converted by `qemu-img convert -c` into a compressed qcow2, put in
#     nginx's root; a range request must get 206 and the qcow2 magic.
#  2. `nbdkit -r --filter=qcow curl url=http://127.0.0.1:PORT/cloud.qcow2`
#     serves it read-only; nbdcopy (several connections; the curl plugin
#     serializes requests, so the filter serializes its calls) reads the
#     disk, which must equal `qemu-img convert -O raw` of the image.
#  3. guestfish (QEMU's NBD client, the Linux kernel, ext4) mounts the
#     partition and finds the files with the sha256 they had on the host.
#  4. The file nginx serves is unchanged.
#
# One appliance launch under TCG (LIBGUESTFS_BACKEND_SETTINGS=force_tcg),
# 10-20 s.

. "$(dirname "$0")/functions.sh"
export PATH=$PATH:/usr/sbin:/sbin
require guestfish qemu-img nbdkit nbdcopy sfdisk
requires nginx -v
requires mkfs.ext4 -V

export LIBGUESTFS_BACKEND_SETTINGS=force_tcg
cd "$TMPD"
M=$((1024 * 1024))
sock=$TMPD/sock

# ---- 1. the image, and nginx -------------------------------------------
mkdir -p tree/etc tree/data www
cp /etc/services tree/etc/services
seq 1 100000 > tree/data/numbers.txt
head -c $((3 * M)) /dev/urandom > tree/data/random.bin
files=(/etc/services /data/numbers.txt /data/random.bin)
mkfs.ext4 -q -F -L cloudimg -d tree fs.img 48M >/dev/null || die "mkfs.ext4 failed"
truncate -s 64M disk.raw
printf 'label: gpt\nstart=2048, size=%d, type=L\n' $((48 * M / 512)) |
    sfdisk -q disk.raw || die "sfdisk failed"
dd if=fs.img of=disk.raw bs=1M seek=1 conv=notrunc status=none
rm fs.img
qemu-img convert -c -f raw -O qcow2 disk.raw www/cloud.qcow2 || die "qemu-img convert -c failed"
rm disk.raw
qemu-img convert -f qcow2 -O raw www/cloud.qcow2 want.raw
compressed=$(qemu-img check --output=json www/cloud.qcow2 |
    /usr/bin/python3 -c 'import json, sys; print(json.load(sys.stdin)["compressed-clusters"])')
echo "cloud.qcow2: $(stat -c %s www/cloud.qcow2) bytes, $compressed compressed clusters"
[ "$compressed" -gt 0 ] || die "qemu-img convert -c compressed nothing"
sum=$(sha256_of www/cloud.qcow2)

# start_nginx: nginx in the foreground (one process, as root, so that it
# reads our private directory) on a free loopback port; sets $port.
start_nginx ()
{
    local try i
    mkdir -p nginx
    for (( try = 0; try < 10; try++ )); do
        port=$(( 20000 + (RANDOM * 32768 + RANDOM) % 30000 ))
        cat > nginx/nginx.conf <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $TMPD/nginx/nginx.pid;
error_log $TMPD/nginx/error.log;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path $TMPD/nginx/body;
    proxy_temp_path $TMPD/nginx/proxy;
    fastcgi_temp_path $TMPD/nginx/fastcgi;
    uwsgi_temp_path $TMPD/nginx/uwsgi;
    scgi_temp_path $TMPD/nginx/scgi;
    server {
        listen 127.0.0.1:$port;
        root $TMPD/www;
    }
}
EOF
        nginx -e "$TMPD/nginx/error.log" -p "$TMPD/nginx" -c "$TMPD/nginx/nginx.conf" &
        NGINX_PID=$!
        on_exit "kill_pid $NGINX_PID"
        for (( i = 0; i < 100; i++ )); do
            # A range request: 206 Partial Content and the qcow2 magic.
            if /usr/bin/python3 - "$port" 2>/dev/null <<'EOF'
import sys, urllib.request
req = urllib.request.Request("http://127.0.0.1:%s/cloud.qcow2" % sys.argv[1],
                             headers={"Range": "bytes=0-3"})
with urllib.request.urlopen(req, timeout=5) as r:
    assert r.status == 206 and r.read() == b"QFI\xfb"
EOF
            then
                echo "nginx serves byte ranges on 127.0.0.1:$port"
                return 0
            fi
            kill -0 "$NGINX_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill_pid "$NGINX_PID"
    done
    cat "$TMPD/nginx/error.log" >&2
    die "nginx did not start, or does not serve byte ranges"
}
start_nginx
url=http://127.0.0.1:$port/cloud.qcow2

# ---- 2. read back through the filter over curl ---------------------------
start_server "$sock" -r --filter="$QCOW_FILTER" curl url="$url"
[ "$(nbdinfo --json "nbd+unix:///?socket=$sock" |
     /usr/bin/python3 -c 'import json, sys; print(json.load(sys.stdin)["exports"][0]["is_read_only"])')" = True ] ||
    die "the filter over curl with -r is not read-only"
nbdcopy "nbd+unix:///?socket=$sock" got.raw || die "nbdcopy through the filter over curl failed"
assert_same got.raw want.raw "the disk read over HTTP through the filter and qemu-img convert"
echo "read back over HTTP: identical to qemu-img convert -O raw"
rm -f got.raw want.raw

# ---- 3. a guest mounts it ---------------------------------------------------
script="run
mount-ro /dev/sda1 /"
for f in "${files[@]}"; do
    script+="
checksum sha256 $f"
done
script+="
ls /data"
out=$(echo "$script" | guestfish --ro --format=raw -a "nbd://?socket=$sock" --no-progress-bars) ||
    die "guestfish on the filter over curl failed"
i=0
for f in "${files[@]}"; do
    i=$((i + 1))
    got=$(sed -n "${i}p" <<< "$out")
    [ "$got" = "$(sha256_of "tree$f")" ] || die "the guest reads $f with sha256 '$got', expected $(sha256_of "tree$f")"
done
listing=$(tail -n +$((i + 1)) <<< "$out" | tr '\n' ' ')
[ "$listing" = "numbers.txt random.bin " ] || die "the guest lists /data as '$listing'"
echo "the guest mounted the partition and read ${#files[@]} files intact; ls /data: $listing"
stop_server "$sock"

# ---- 4. nothing written -----------------------------------------------------
[ "$(sha256_of www/cloud.qcow2)" = "$sum" ] || die "the image on the web server changed"
