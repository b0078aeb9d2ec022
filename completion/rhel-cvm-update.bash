# bash completion for rhel-cvm-update(8)
# The command and option lists mirror rhel_cvm_update/cli.py; tests/packaging checks
# that every command and option the parser knows is offered here.

_rhel_cvm_update()
{
    local cur prev words cword
    _init_completion || return

    local commands="inspect eventlog predict reseal enroll boot update confirm status config grow-root"
    local global_opts="--config --version --help -h"

    # The first word that is not an option (or an option's value) is the command.
    local i command="" subcommand=""
    for (( i = 1; i < cword; i++ )); do
        case "${words[i]}" in
            --config) (( i++ )) ;;
            -*) ;;
            *)
                if [[ -z $command ]]; then
                    command=${words[i]}
                elif [[ -z $subcommand ]]; then
                    subcommand=${words[i]}
                fi
                ;;
        esac
    done

    case "$prev" in
        --config|--event-log|--pcrs-from|--shim|--uki)
            _filedir
            return
            ;;
        --efivars)
            _filedir -d
            return
            ;;
        --source)
            COMPREPLY=( $(compgen -W "auto log model" -- "$cur") )
            return
            ;;
        --hash)
            COMPREPLY=( $(compgen -W "sha1 sha256 sha384 sha512" -- "$cur") )
            return
            ;;
        --key-file)
            COMPREPLY=( $(compgen -W "-" -- "$cur") )
            return
            ;;
        --tpm|--pcr|--settle)
            return
            ;;
    esac

    if [[ -z $command ]]; then
        if [[ $cur == -* ]]; then
            COMPREPLY=( $(compgen -W "$global_opts" -- "$cur") )
        else
            COMPREPLY=( $(compgen -W "$commands" -- "$cur") )
        fi
        return
    fi

    local opts=""
    case "$command" in
        inspect)  opts="--json --hash" ;;
        eventlog) opts="--json" ;;
        predict)  opts="--uki --shim --event-log --source --tpm --offline --pcrs-from --efivars --explain --json" ;;
        reseal)   opts="--uki --dry-run --json --key-file --pcr" ;;
        enroll)   opts="--from-tpm2-import --dry-run --json" ;;
        update)   opts="--settle --no-wait --json" ;;
        confirm)  opts="--no-wait --json" ;;
        grow-root) opts="--dry-run --json --check" ;;
        status)   opts="--json" ;;
        boot)
            case "$subcommand" in
                "") COMPREPLY=( $(compgen -W "list add remove" -- "$cur") ); return ;;
                list) opts="--json" ;;
                add) opts="--uki --once --dry-run" ;;
                remove) opts="--uki --dry-run" ;;
            esac
            ;;
        config)
            case "$subcommand" in
                "") COMPREPLY=( $(compgen -W "show" -- "$cur") ); return ;;
                show) opts="--json" ;;
            esac
            ;;
    esac
    opts="$opts --help"

    if [[ $cur == -* ]]; then
        COMPREPLY=( $(compgen -W "$opts" -- "$cur") )
    elif [[ $command == inspect || $command == eventlog ]]; then
        _filedir
    fi
} &&
complete -F _rhel_cvm_update rhel-cvm-update
