#!/usr/bin/env bash
# irq-affinity.sh -- show (and optionally set) where the interrupts of the block devices and
# NICs that ringbd uses are handled, next to the CPUs ringbd's shards should run on.
#
# Usage:
#   tuning/irq-affinity.sh                 show every block device and NIC with MSI/MSI-X IRQs
#   tuning/irq-affinity.sh vda eth0        show only these devices
#   tuning/irq-affinity.sh --set vda 1     route every IRQ of vda to CPU list "1" (root)
#   tuning/irq-affinity.sh --set eth0 0-3  the same for a NIC (spread queues with --spread)
#   tuning/irq-affinity.sh --spread eth0 0-3   one queue IRQ per CPU of the list, round robin
#
# For each IRQ it prints: number, name, requested affinity (smp_affinity_list), effective
# affinity (where the kernel really delivers it; managed IRQs of multi-queue drivers ignore
# writes) and the interrupt count per CPU. It also prints the blk-mq queue -> CPU map of
# block devices and the settings that interact with affinity (rq_affinity, irqbalance).
#
# Notes:
#   * irqbalance rewrites affinities every 10 s; stop it (or ban the IRQs with
#     IRQBALANCE_BANNED_CPULIST) before setting them by hand.
#   * Managed IRQs (NVMe, virtio-blk with several queues) reject writes with EIO: their
#     queue-to-CPU map is fixed by blk-mq. Pin the shards to match instead (tuning/README.md).
#   * Settings do not survive a reboot: put the --set lines in a systemd unit or udev rule.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

# Device -> its PCI function directory (the one holding msi_irqs), or nothing.
pci_dir() {
  local dev=$1 path
  if [[ -e /sys/block/$dev/device ]]; then
    path=$(readlink -f "/sys/block/$dev/device")
  elif [[ -e /sys/class/net/$dev/device ]]; then
    path=$(readlink -f "/sys/class/net/$dev/device")
  else
    return 1
  fi
  # virtio devices sit one level below their PCI function.
  while [[ $path != / && ! -d $path/msi_irqs ]]; do path=${path%/*}; done
  [[ -d $path/msi_irqs ]] && echo "$path"
}

irqs_of() {
  local dir
  dir=$(pci_dir "$1") || return 0
  local f
  for f in "$dir"/msi_irqs/*; do echo "${f##*/}"; done | sort -n
}

show_device() {
  local dev=$1 irq name counts
  local -a irqs
  mapfile -t irqs < <(irqs_of "$dev")
  if ((${#irqs[@]} == 0)); then
    echo "$dev: no MSI/MSI-X interrupts found"
    return 0
  fi
  echo "== $dev ($(pci_dir "$dev"))"
  printf '  %-5s %-28s %-10s %-10s %s\n' IRQ NAME AFFINITY EFFECTIVE "COUNT PER CPU"
  for irq in "${irqs[@]}"; do
    [[ -d /proc/irq/$irq ]] || continue
    name=$(awk -v i="$irq:" '$1 == i {print $NF}' /proc/interrupts)
    counts=$(awk -v i="$irq:" -v n="$(nproc)" '$1 == i {s = ""; for (c = 2; c <= n + 1; c++) s = s " " $c; print s}' /proc/interrupts)
    printf '  %-5s %-28s %-10s %-10s%s\n' "$irq" "${name:-?}" \
      "$(cat "/proc/irq/$irq/smp_affinity_list" 2>/dev/null || echo ?)" \
      "$(cat "/proc/irq/$irq/effective_affinity_list" 2>/dev/null || echo ?)" "$counts"
  done
  if [[ -d /sys/block/$dev/mq ]]; then
    local q
    for q in /sys/block/"$dev"/mq/*; do
      echo "  blk-mq hw queue ${q##*/}: cpus $(cat "$q/cpu_list")"
    done
    echo "  scheduler: $(cat "/sys/block/$dev/queue/scheduler")  nr_requests: $(cat "/sys/block/$dev/queue/nr_requests")  rq_affinity: $(cat "/sys/block/$dev/queue/rq_affinity")"
  fi
  if [[ -d /sys/class/net/$dev ]]; then
    local -a queues=("/sys/class/net/$dev/queues"/*)
    echo "  queues: ${queues[*]##*/}"
  fi
}

set_affinity() {
  local dev=$1 cpus=$2 irq
  for irq in $(irqs_of "$dev"); do
    if echo "$cpus" >"/proc/irq/$irq/smp_affinity_list" 2>/dev/null; then
      echo "irq $irq -> $cpus"
    else
      echo "irq $irq: cannot set (managed IRQ or not root); effective $(cat "/proc/irq/$irq/effective_affinity_list")" >&2
    fi
  done
}

spread_affinity() {
  local dev=$1 list=$2 irq i=0
  local -a cpus
  mapfile -t cpus < <(echo "$list" | awk -F, '{for (f = 1; f <= NF; f++) {n = split($f, r, "-"); if (n == 1) print r[1]; else for (c = r[1]; c <= r[2]; c++) print c}}')
  for irq in $(irqs_of "$dev"); do
    set_affinity_one "$irq" "${cpus[i % ${#cpus[@]}]}"
    i=$((i + 1))
  done
}

set_affinity_one() {
  if echo "$2" >"/proc/irq/$1/smp_affinity_list" 2>/dev/null; then
    echo "irq $1 -> $2"
  else
    echo "irq $1: cannot set (managed IRQ or not root)" >&2
  fi
}

case ${1:-} in
  -h|--help) usage; exit 0 ;;
  --set) [[ $# -eq 3 ]] || { usage >&2; exit 2; }; set_affinity "$2" "$3"; show_device "$2"; exit 0 ;;
  --spread) [[ $# -eq 3 ]] || { usage >&2; exit 2; }; spread_affinity "$2" "$3"; show_device "$2"; exit 0 ;;
esac

echo "online CPUs: $(cat /sys/devices/system/cpu/online)   isolated: $(cat /sys/devices/system/cpu/isolated 2>/dev/null || echo -)   nohz_full: $(cat /sys/devices/system/cpu/nohz_full 2>/dev/null || echo -)"
if pgrep -x irqbalance >/dev/null 2>&1; then
  echo "irqbalance: running (it will override manual affinities)"
else
  echo "irqbalance: not running"
fi
if (($#)); then
  devices=("$@")
else
  mapfile -t devices < <(
    for d in /sys/block/*; do d=${d##*/}; [[ $d == loop* || $d == zram* || $d == ram* ]] || echo "$d"; done
    for d in /sys/class/net/*; do d=${d##*/}; [[ -e /sys/class/net/$d/device ]] && echo "$d"; done
  )
fi
for dev in "${devices[@]}"; do show_device "$dev"; done
