#!/bin/sh
# _ip_command.sh FIFO NAME - the [libvirt] ip_command of bench_concurrency
# (not a benchmark). libvirt's test driver gives every domain the same fake
# address; this gives each a distinct one, derived from its name (CRC32:
# 10.x.y.z), prints it for the agent and tells the benchmark's stand-in
# Acceleration Server ("NAME IP" on the FIFO, one line, written at once).
set -eu
fifo=$1
name=$2
sum=$(printf '%s' "$name" | cksum | cut -d ' ' -f 1)
ip="10.$(( (sum >> 16) & 255 )).$(( (sum >> 8) & 255 )).$(( sum & 255 ))"
printf '%s %s\n' "$name" "$ip" >"$fifo"
printf '%s\n' "$ip"
