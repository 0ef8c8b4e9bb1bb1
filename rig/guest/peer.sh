#!/bin/sh
# The host end of L2's network link, played by L1 (or, in rig/selftest.sh, by
# the host inside a private network namespace). POSIX sh; needs ip and ping
# (busybox's are fine).
#
#   peer.sh SCOPE IFACE LOCAL_CIDR REMOTE_IP WAIT_SECS [AGAIN]
#
# Waits for IFACE to appear (the VMM creates the tap), gives it LOCAL_CIDR
# (link-local only), waits until REMOTE_IP answers, then pings it 3 times.
# Prints "CHECK <SCOPE>.net.tap ..." and "CHECK <SCOPE>.net.ping-l2 ...".
#
# AGAIN=1: L2 reboots, and its VMM (trellis rebuilding the VM, QEMU started
# again) closes the tap, which deletes it, and creates it anew. The peer
# then waits for the tap to lose its address (the old one gone) and to be
# there again, addresses the new one and prints "CHECK <SCOPE>.net.tap-again
# ...". It does not ping in the second boot: L2 pings it (l2.reboot.net).
# All of it within WAIT_SECS of the start.
set -u
scope=$1 ifc=$2 cidr=$3 remote=$4 wait=$5 again=${6:-0}
t0=$(cut -d. -f1 /proc/uptime)
left() { echo $((wait - ($(cut -d. -f1 /proc/uptime) - t0))); }

# Ask the kernel (ip link), not /sys/class/net: sysfs shows the network
# namespace it was mounted in, which is not ours under `unshare --net`.
present() { ip link show dev "$ifc" >/dev/null 2>&1; }
i=0
while ! present && [ $i -lt $((wait * 10)) ]; do
    sleep 0.1
    i=$((i + 1))
done
if ! present; then
    echo "CHECK $scope.net.tap fail $ifc did not appear within $wait s"
    exit 1
fi
ip addr add "$cidr" dev "$ifc" && ip link set "$ifc" up
echo "CHECK $scope.net.tap ok $ifc appeared after $((i * 100)) ms; address $cidr"

# L2 needs time to boot and bring its interface up: retry single pings.
start=$(cut -d. -f1 /proc/uptime)
until ping -c 1 -W 1 "$remote" >/dev/null 2>&1; do
    if [ $(($(cut -d. -f1 /proc/uptime) - start)) -ge "$wait" ]; then
        echo "CHECK $scope.net.ping-l2 fail no reply from $remote within $wait s"
        exit 1
    fi
    sleep 0.5
done
out=$(ping -c 3 -W 2 "$remote" 2>&1 | grep 'packets transmitted')
case $out in
*" 3 packets received"* | *" 3 received"*)
    echo "CHECK $scope.net.ping-l2 ok $remote: $out" ;;
*)
    echo "CHECK $scope.net.ping-l2 fail $remote: ${out:-no output}"
    exit 1 ;;
esac
[ "$again" = 1 ] || exit 0

# The reboot: the address goes with the old tap; then the new one appears.
addressed() { ip addr show dev "$ifc" 2>/dev/null | grep -q "inet $cidr "; }
i=0
while addressed && [ "$(left)" -gt 0 ]; do sleep 0.2; i=$((i + 1)); done
while ! present && [ "$(left)" -gt 0 ]; do sleep 0.1; done
if addressed || ! present; then
    echo "CHECK $scope.net.tap-again fail $ifc was not deleted and created again within $wait s"
    exit 1
fi
ip addr add "$cidr" dev "$ifc" && ip link set "$ifc" up
echo "CHECK $scope.net.tap-again ok $ifc deleted ~$((i / 5)) s after the pings and created again; address $cidr again"
