#!/bin/bash
# agentvm-sandbox: the guest's side of a sandboxed clone (agentvm run --clone),
# run as the agent user. Written by the guest init; everything here happens in
# the guest, on its own disk, from the host's project shared read-only.
#
#   agentvm-sandbox prepare NAME COMMIT [BRANCH]
#       First run: clone the host's repository (history and branches, remote
#       `host`), check out BRANCH at COMMIT (detached without BRANCH), then
#       apply the host's uncommitted state: staged changes to the index, and
#       changed tracked files and untracked files that are not ignored to the
#       work tree, byte for byte. Later runs find the work tree and do nothing.
#   agentvm-sandbox export
#       Write the sandbox's state for the host: a bundle with one ref,
#       refs/agentvm/export (HEAD, plus one commit holding the uncommitted work
#       if the work tree is dirty, made on a copy of the index so the
#       sandbox's own index and work tree do not change), and status.json,
#       which names that commit. When the host has the commit already, only
#       status.json. With AGENTVM_SANDBOX_MARK set (by the guest init, at
#       the end of a run, when nothing else runs), it then records the
#       result's commit and the status there, so that the next run can tell
#       whether the disk changed since (see sandbox.rs).
#
# Paths (overridable for tests): AGENTVM_SANDBOX_HOST (the host's project),
# AGENTVM_SANDBOX_WORK (the sandbox's work tree), AGENTVM_SANDBOX_EXPORT
# (where the results go).
set -euo pipefail

host_repo=${AGENTVM_SANDBOX_HOST:-/agentvm/host}
work=${AGENTVM_SANDBOX_WORK:-/agentvm/sandbox/work}
out=${AGENTVM_SANDBOX_EXPORT:-/agentvm/export}
ref=refs/agentvm/export

fail() {
    echo "agentvm-sandbox: $*" >&2
    exit 1
}

# git on the host's project: its files belong to the host's user, and its
# index's stat data was taken on the host (compare sizes and times only).
host_git() {
    git -c safe.directory='*' -c core.checkStat=minimal -c core.trustctime=false -C "$host_repo" "$@"
}

prepare() {
    local name=$1 commit=$2 branch=${3:-}
    [ -d "$work/.git" ] && return 0
    local new="$work.new"
    rm -rf "$new"
    # --no-local: the pack protocol reads only what is reachable and copes
    # with the host repacking meanwhile (a local clone copies the object
    # files, and failed when the host's background auto gc packed them).
    git -c safe.directory='*' clone -q --no-local --no-checkout --origin host "$host_repo" "$new"
    cd "$new"
    git config agentvm.name "$name"
    git config agentvm.base "$branch"
    git config agentvm.basecommit "$commit"
    if [ -n "$branch" ]; then
        git checkout -q -B "$branch" "$commit"
        git branch -q --set-upstream-to="host/$branch" 2>/dev/null || true
    else
        git checkout -q --detach "$commit"
    fi
    apply_host_state "$commit"
    cd /
    # A work tree whose .git is gone is kept aside, not mixed in.
    [ -e "$work" ] && mv "$work" "$work.lost-$(date +%s)"
    mv "$new" "$work"
}

# The host's staged changes (a patch against COMMIT, applied to the index and
# the work tree), then its work tree's changed and untracked files as bytes.
apply_host_state() {
    local commit=$1 tmp
    tmp=$(mktemp -d)
    host_git diff-index --cached -p --binary --full-index --no-renames --no-color --no-ext-diff --no-textconv \
        --no-relative --src-prefix=a/ --dst-prefix=b/ "$commit" > "$tmp/staged.patch"
    if [ -s "$tmp/staged.patch" ]; then
        git apply --index --whitespace=nowarn "$tmp/staged.patch" || fail "cannot apply the host's staged changes"
    fi
    host_git diff -z --name-only --no-renames --no-ext-diff --no-textconv --no-relative > "$tmp/changed"
    host_git ls-files -z --others --exclude-standard > "$tmp/untracked"
    : > "$tmp/copy"
    local path
    while IFS= read -r -d '' path; do
        if [ -e "$host_repo/$path" ] || [ -L "$host_repo/$path" ]; then
            printf '%s\0' "$path" >> "$tmp/copy"
        else
            rm -f -- "$path"
        fi
    done < "$tmp/changed"
    cat "$tmp/untracked" >> "$tmp/copy"
    if [ -s "$tmp/copy" ]; then
        tar -C "$host_repo" --null --no-recursion -T "$tmp/copy" -cf - | tar -xpf -
    fi
    rm -rf "$tmp"
}

export_state() {
    cd "$work"
    local head
    head=$(git rev-parse -q --verify 'HEAD^{commit}') || fail "the sandbox's HEAD has no commit: commit something first"
    local name base basecommit
    name=$(git config agentvm.name || echo sandbox)
    base=$(git config agentvm.base || true)
    basecommit=$(git config agentvm.basecommit || true)

    # The uncommitted work, staged or not, and untracked files that are not
    # ignored, as one commit on HEAD, made on a copy of the index.
    local result dirty=false tree
    # Global: the trap runs after this function returned.
    index=$(mktemp)
    trap 'rm -f "$index" "$index.lock"' EXIT
    if [ -f "$(git rev-parse --git-path index)" ]; then
        cp "$(git rev-parse --git-path index)" "$index"
    else
        rm -f "$index"
    fi
    GIT_INDEX_FILE=$index git add -A
    tree=$(GIT_INDEX_FILE=$index git write-tree)
    result=$head
    if [ "$tree" != "$(git rev-parse "$head^{tree}")" ]; then
        local ident=()
        git config user.name > /dev/null || ident+=(-c user.name=agentvm)
        git config user.email > /dev/null || ident+=(-c user.email=agentvm@sandbox.invalid)
        result=$(git "${ident[@]}" commit-tree "$tree" -p "$head" -m "agentvm: uncommitted work in sandbox $name")
        dirty=true
    fi
    git update-ref "$ref" "$result"
    rm -f "$out/result.bundle"
    if host_git cat-file -e "$result^{commit}" 2> /dev/null; then
        # The host has it: naming it (in the status) is all it takes.
        write_status "$head" "$result" "$dirty" "$base" "$basecommit"
        write_mark "$result"
        return 0
    fi

    # Leave out what the host has: its branches that do not contain the
    # result, and the result's parents where the host has them.
    local nots=() oid parent
    while read -r oid; do
        git cat-file -e "$oid^{commit}" 2> /dev/null || continue
        git merge-base --is-ancestor "$result" "$oid" && continue
        nots+=("^$oid")
    done < <(host_git for-each-ref --format='%(objectname)' refs/heads)
    for parent in $(git rev-list --no-walk --parents "$result" | cut -d' ' -s -f2-); do
        host_git cat-file -e "$parent^{commit}" 2> /dev/null && nots+=("^$parent")
    done
    local bundle="$out/.result.$$.bundle"
    git bundle create -q "$bundle" "$ref" "${nots[@]}"
    mv -f "$bundle" "$out/result.bundle"
    write_status "$head" "$result" "$dirty" "$base" "$basecommit"
    write_mark "$result"
}

# The record of a complete export: the result's commit, then the status.
write_mark() {
    local mark=${AGENTVM_SANDBOX_MARK:-}
    [ -n "$mark" ] || return 0
    { printf '%s\n' "$1"; cat "$out/status.json"; } > "$mark.tmp"
    mv -f "$mark.tmp" "$mark"
}

# status.json: what `agentvm sandbox ls` shows (the host treats it as the
# sandbox's word, nothing more).
write_status() {
    local head=$1 result=$2 dirty=$3 base=$4 basecommit=$5 branch against ahead=null
    branch=$(git symbolic-ref -q --short HEAD || true)
    # Ahead of the host's branch as the host has it now, else as cloned.
    against=$(host_git rev-parse -q --verify "refs/heads/$base^{commit}" 2> /dev/null || true)
    git cat-file -e "$against^{commit}" 2> /dev/null || against=$(git rev-parse -q --verify "refs/remotes/host/$base" || true)
    [ -n "$against" ] || against=$basecommit
    [ -n "$against" ] && ahead=$(git rev-list --count "$head" "^$against" 2> /dev/null || echo null)
    local tmp="$out/.status.$$.json"
    printf '{"head":"%s","result":"%s","branch":%s,"base":%s,"dirty":%s,"ahead":%s}\n' \
        "$head" "$result" "$(json_string "$branch")" "$(json_string "$base")" "$dirty" "$ahead" > "$tmp"
    mv -f "$tmp" "$out/status.json"
}

# A ref name as a JSON string (null when empty): ref names hold no
# backslash or control character, only quotes need escaping.
json_string() {
    if [ -z "$1" ]; then echo null; else printf '"%s"' "${1//\"/\\\"}"; fi
}

case "${1:-}" in
    prepare)
        [ $# -ge 3 ] || fail "usage: agentvm-sandbox prepare NAME COMMIT [BRANCH]"
        prepare "$2" "$3" "${4:-}"
        ;;
    export) export_state ;;
    *) fail "usage: agentvm-sandbox prepare NAME COMMIT [BRANCH] | export" ;;
esac
