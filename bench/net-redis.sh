#!/usr/bin/env bash
# Used once by hand for docs/benchmarks.md until `spanvmm-bench devices` exists (issue 16). Run as root
# from the repository after building spanvmm (release) and the guest; paths below are examples.
# Interleaved redis-benchmark runs against spanvmm and QEMU microvm (same ELF, same tap/bridge).
set -u
NS=spvm-netmeasure
ELF=${ELF:-target/guest-images/spanguest.elf}
VMM=${VMM:-${CARGO_TARGET_DIR:-target}/release/spanvmm}
GUEST="workload=dirty,verify,kv mib=16 rate=2000 ip=10.0.0.2/24 gw=10.0.0.1 report_ms=1000"
ip netns add $NS
x() { ip netns exec $NS "$@"; }
x ip link set lo up
x ip link add br0 type bridge; x ip addr add 10.0.0.1/24 dev br0; x ip link set br0 up
x ip tuntap add dev tap0 mode tap; x ip link set tap0 master br0; x ip link set tap0 up
bench() { x redis-benchmark -h 10.0.0.2 -t ping,set,get,incr -n 100000 -c 20 -P 4 --csv 2>&1 | grep -v '"test"' | sed "s/^/$1,/"; }
waitup() { for i in $(seq 100); do x redis-cli -h 10.0.0.2 PING 2>/dev/null | grep -q PONG && return; sleep 0.1; done; echo "no answer"; }
for round in 1 2 3; do
  ip netns exec $NS $VMM run --kernel $ELF --memory 128 --cmdline "$GUEST" --net tap=tap0,mac=52:54:00:5a:00:02 --serial none --api-socket /tmp/netm.sock >/dev/null 2>&1 &
  P=$!; waitup; bench spanvmm; kill -9 $P; wait $P 2>/dev/null; rm -f /tmp/netm.sock; sleep 0.5
  ip netns exec $NS qemu-system-x86_64 -enable-kvm -M microvm,acpi=off -m 128 -global virtio-mmio.force-legacy=false -nodefaults -no-user-config -nographic -serial none -kernel $ELF -append "$GUEST" -netdev tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off -device virtio-net-device,netdev=n0,mac=52:54:00:5a:00:02 >/dev/null 2>&1 &
  P=$!; waitup; kill -0 $P || echo "qemu died"; bench qemu; kill -9 $P; wait $P 2>/dev/null; sleep 0.5
done
ip netns del $NS
