# kmskeys fleet flush: run as root by SSM Run Command (document schema 2.2, aws:runShellScript).
# Every parameter reaches this script as an environment variable SSM_<name> (interpolationType
# ENV_VAR, SSM Agent >= 3.3.2746.0), never spliced into its text: a value from an event cannot
# become shell syntax. SSM has already refused any value outside the parameter's allowedPattern;
# the script checks every name against the kmskeys grammar again before it runs anything.
set -eu
set -f
KMSKEYS='@KMSKEYS@'
if [ -z "${SSM_Source+x}" ] || [ -z "${SSM_Id+x}" ] || [ -z "${SSM_Prefix+x}" ]; then
  echo 'kmskeys-flush: parameters missing from the environment: SSM Agent >= 3.3.2746.0 needed' >&2
  exit 2
fi
PATH_PREFIX=${SSM_PathPrefix-}
JITTER=${SSM_JitterSeconds:-0}
# A kmskeys name: [A-Za-z0-9][A-Za-z0-9_./@+-]*, at most 200 bytes, no '..', no empty or '.'
# path segment (kmskeys/names.py).
valid_name() {
  case $1 in
    [A-Za-z0-9]*) ;;
    *) return 1 ;;
  esac
  case $1 in
    *[!A-Za-z0-9_./@+-]* | *..* | *//* | */ | */./* | */.) return 1 ;;
  esac
  [ "${#1}" -le 200 ]
}
valid_prefix() {
  case $1 in
    [a-z]*) ;;
    *) return 1 ;;
  esac
  case $1 in
    *[!a-z0-9_-]*) return 1 ;;
  esac
  [ "${#1}" -le 32 ]
}
case $JITTER in
  '' | *[!0-9]*) echo 'kmskeys-flush: refusing JitterSeconds: not a number' >&2; exit 3 ;;
esac
[ "${#JITTER}" -le 3 ] && [ "$JITTER" -le 600 ] || { echo 'kmskeys-flush: refusing JitterSeconds over 600' >&2; exit 3; }
valid_prefix "$SSM_Prefix" || { echo 'kmskeys-flush: refusing the description prefix' >&2; exit 3; }
case $PATH_PREFIX in
  '') ;;
  */) valid_name "${PATH_PREFIX%/}" || { echo 'kmskeys-flush: refusing the path prefix' >&2; exit 3; } ;;
  *) echo 'kmskeys-flush: refusing a path prefix without its trailing /' >&2; exit 3 ;;
esac
# The names to flush, one per line, as the event source names them.
names=''
add() {
  n=$1
  if [ -n "$PATH_PREFIX" ]; then
    case $n in
      "$PATH_PREFIX"?*) n=${n#"$PATH_PREFIX"} ;;
      *) echo "kmskeys-flush: $n is not under $PATH_PREFIX: nothing to flush"; return 0 ;;
    esac
  fi
  valid_name "$n" || { echo 'kmskeys-flush: refusing a name outside the kmskeys grammar' >&2; exit 3; }
  names="$names$n
"
}
case $SSM_Source in
  name)
    for n in $SSM_Id; do add "$n"; done
    ;;
  secretsmanager)
    case $SSM_Id in
      arn:*:secretsmanager:*:secret:*)
        # A full ARN ends in -XXXXXX, six random characters Secrets Manager adds; a partial ARN
        # does not. Flush both readings: a name nobody cached costs nothing.
        rest=${SSM_Id#arn:*:secret:}
        add "$rest"
        [ "${rest%-??????}" = "$rest" ] || add "${rest%-??????}"
        ;;
      arn:*) echo 'kmskeys-flush: not a Secrets Manager secret ARN' >&2; exit 3 ;;
      *) add "$SSM_Id" ;;
    esac
    ;;
  parameterstore)
    add "${SSM_Id#/}"
    ;;
  *) echo 'kmskeys-flush: refusing an unknown Source' >&2; exit 3 ;;
esac
if [ -z "$names" ]; then
  exit 0
fi
if [ "$JITTER" -gt 0 ]; then
  # Spread the fleet's re-resolutions: wait a random 0..JitterSeconds s before flushing.
  wait=$(od -An -N2 -tu2 /dev/urandom | tr -d ' ')
  sleep $((wait % (JITTER + 1)))
fi
printf '%s' "$names" | while IFS= read -r n; do
  "$KMSKEYS" flush "$n" --prefix "$SSM_Prefix"
done
