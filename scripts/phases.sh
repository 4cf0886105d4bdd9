# Sourced by scripts/test.sh: `phase NAME CMD...` runs and times a step; `bg_start NAME CMD...`
# / `bg_wait NAME` run one in the background (its output goes to $SD_LORA_CACHE/logs/NAME.log
# and is shown when waited for); `phase_report` prints the table. The table is also printed
# when a phase fails.
PHASE_NAMES=()
PHASE_SECS=()
PHASE_T0=$SECONDS
declare -A BG_PIDS BG_T0

phase_report() {
    local i total=$((SECONDS - PHASE_T0))
    echo
    echo "== phase times =="
    for i in "${!PHASE_NAMES[@]}"; do
        printf '%-16s %4d min %02d s\n' "${PHASE_NAMES[$i]}" $((PHASE_SECS[i] / 60)) $((PHASE_SECS[i] % 60))
    done
    printf '%-16s %4d min %02d s\n' "total" $((total / 60)) $((total % 60))
}

phase() {
    local name=$1 t0=$SECONDS rc=0
    shift
    echo "== $name: $* =="
    "$@" || rc=$?
    PHASE_NAMES+=("$name")
    PHASE_SECS+=($((SECONDS - t0)))
    if ((rc != 0)); then
        echo "== $name FAILED (exit $rc) =="
        phase_report
        exit "$rc"
    fi
}

bg_start() {
    local name=$1
    shift
    echo "== $name (background): $* =="
    BG_T0[$name]=$SECONDS
    "$@" >"$SD_LORA_CACHE/logs/$name.log" 2>&1 &
    BG_PIDS[$name]=$!
}

bg_wait() {
    local name=$1 rc=0 t0=$SECONDS
    wait "${BG_PIDS[$name]}" || rc=$?
    cat "$SD_LORA_CACHE/logs/$name.log"
    # the time spent waiting is what the background step added to the run
    PHASE_NAMES+=("$name (wait)")
    PHASE_SECS+=($((SECONDS - t0)))
    echo "== $name: done after $((SECONDS - BG_T0[$name])) s in the background =="
    if ((rc != 0)); then
        echo "== $name FAILED (exit $rc) =="
        phase_report
        exit "$rc"
    fi
}
