# What a device call brings back, and the compile caches a later session carries in; sourced by gpu_session.sh.
# $OUT brings back at most 8 files of 16 MiB, 64 MiB in all (the device tool's limits), so every call ends with
# `pack_out`: results.jsonl, logs.tar.gz (every log so far, the py-spy summaries logs/*.where.txt and the
# embedded seed_replay's lengths.json among them), stacks.tar (the sampled stacks of this call's steps) and
# the compile caches, besides device.txt and the step's own files.
# Needs BENCH (results and logs), OUT, CALL_START (a file as old as this device call).

# Compile caches, the most useful first, as paths under CACHE_ROOT. A fresh H100's first engine start spent
# ~110 s after its CUDA graphs compiling Triton kernels (vLLM's model runner warm-up) and 26 s in
# torch.compile; a later start on the same machine, with the caches warm, 10 s and 5 s (2026-11-24).
# vLLM points Triton and Inductor into its own cache folder (one per model shape and settings), so that
# folder comes first.
CACHE_ROOT=${CACHE_ROOT:-/}
H=${HOME#/}
CACHE_DIRS=${CACHE_DIRS:-"$H/.cache/vllm $H/.triton/cache $H/.cache/flashinfer tmp/torchinductor_$(id -un)"}
PART=$((15 * 1024 * 1024))  # bytes per file brought back
CACHE_PARTS=${CACHE_PARTS:-2}  # files at most for the caches (fewer when $OUT has less room)

pack_out() {
  cp "$BENCH/results.jsonl" "$OUT/" 2>/dev/null
  cp /tmp/ii-bench/lengths.json "$BENCH/" 2>/dev/null  # the embedded seed_replay's lengths, to compare/commit
  tar -czf "$OUT/logs.tar.gz" -C "$BENCH" --exclude='*.stacks.gz' --exclude='.call-*' . 2>/dev/null
  # newest first, while the tar stays under 15 MiB (older calls' stacks came back with those calls)
  local total=0 files=() f size
  for f in $(ls -t "$BENCH"/logs/*.stacks.gz 2>/dev/null); do
    [ "$f" -nt "$CALL_START" ] || continue
    size=$(stat -c %s "$f")
    (( total + size < PART )) || continue
    total=$((total + size)); files+=("logs/$(basename "$f")")
  done
  [ ${#files[@]} -gt 0 ] && tar -cf "$OUT/stacks.tar" -C "$BENCH" "${files[@]}"
  pack_caches
  true
}

# CACHE_DIRS in order, each compressed once, as many as fit in the files left (8 in all), in 15 MiB parts
# caches.tar.gz.part0, part1, ... (concatenated archives: restore_caches reads past each one's end); a
# folder too large is left out and a later, smaller one may still fit. Their sizes go to device.txt.
pack_caches() {
  local d i=0 size total=0 parts picked=() names=()
  parts=$((8 - 1 - $(ls "$OUT" | grep -cvx device.txt))); (( parts > CACHE_PARTS )) && parts=$CACHE_PARTS
  for d in $CACHE_DIRS; do
    [ -d "$CACHE_ROOT/$d" ] || continue
    (cd "$CACHE_ROOT" && du -sh "$d") | sed 's/^/cache /' >> "$OUT/device.txt"
    (( parts > 0 )) || continue
    i=$((i + 1)); tar -I 'gzip -1' -cf "$BENCH/caches.$i.tgz" -C "$CACHE_ROOT" "$d" 2>/dev/null
    size=$(stat -c %s "$BENCH/caches.$i.tgz")
    if (( total + size < parts * PART )); then
      total=$((total + size)); picked+=("$BENCH/caches.$i.tgz"); names+=("$d")
    fi
  done
  if [ ${#picked[@]} -gt 0 ]; then
    cat "${picked[@]}" | split -b "$PART" -d -a 1 - "$OUT/caches.tar.gz.part"
    echo "caches packed: ${names[*]}" >> "$OUT/device.txt"
  elif (( i > 0 || parts <= 0 )); then
    echo "caches packed: none (files left: $parts)" >> "$OUT/device.txt"
  fi
  rm -f "$BENCH"/caches.*.tgz
}

# Caches carried in from an earlier machine (a folder of caches.tar.gz.part*: from this session's last call
# after a machine went back, or a copy kept from an earlier session; see RESULTS.md), once per machine;
# files already there (compiled on this machine) stay.
restore_caches() {
  local carried=$1
  ls "$carried"/caches.tar.gz.part* > /dev/null 2>&1 && [ ! -f "$CACHE_ROOT/tmp/.ii-caches-restored" ] || return 0
  cat "$carried"/caches.tar.gz.part* | tar -xzf - -C "$CACHE_ROOT" --ignore-zeros --skip-old-files \
    && touch "$CACHE_ROOT/tmp/.ii-caches-restored"
}
