{{/* The chart's name, overridable. */}}
{{- define "jobrunner.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: names its objects and its lease group. */}}
{{- define "jobrunner.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "jobrunner.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Helm's recommended labels. */}}
{{- define "jobrunner.labels" -}}
helm.sh/chart: {{ include "jobrunner.chart" . }}
{{ include "jobrunner.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: jobrunner
{{- end }}

{{- define "jobrunner.selectorLabels" -}}
app.kubernetes.io/name: {{ include "jobrunner.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "jobrunner.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "jobrunner.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "jobrunner.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion }}
{{- if .Values.image.registry }}
{{- printf "%s/%s:%s" .Values.image.registry .Values.image.repository $tag }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The lease group: Lease names start with it; one release, one group. */}}
{{- define "jobrunner.leaseGroup" -}}
{{- include "jobrunner.fullname" . | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/* Rules across values that values.schema.json cannot express: values that would render
and install fine, and then not work. Each one fails rendering, so `helm lint --strict`,
`helm template` and `helm install` refuse them. Seconds may be numbers or, from `--set`
(which passes decimals as strings), numeric strings: float64 reads both. */}}
{{- define "jobrunner.validate" -}}
{{- $leases := .Values.leases }}
{{- $renew := float64 $leases.renewSeconds }}
{{- $deadline := float64 $leases.renewDeadlineSeconds }}
{{- $duration := float64 $leases.durationSeconds }}
{{- if not (and (gt $renew 0.0) (lt $renew $deadline) (lt $deadline $duration)) }}
{{- include "jobrunner.refuse" (printf "leases: 0 < renewSeconds (%v) < renewDeadlineSeconds (%v) < durationSeconds (%v) must hold: a replica renews its Lease several times before its deadline, and stops its dispatchers before the others may take its buckets over; the operator refuses to start otherwise" $leases.renewSeconds $leases.renewDeadlineSeconds $leases.durationSeconds) }}
{{- end }}
{{- if le (float64 .Values.terminationGracePeriodSeconds) (float64 .Values.shutdownGraceSeconds) }}
{{- include "jobrunner.refuse" (printf "terminationGracePeriodSeconds (%v) must exceed shutdownGraceSeconds (%v): on SIGTERM the operator lets in-flight settlements take up to shutdownGraceSeconds and only then gives up its Leases; killed before, its settlements are cut and its buckets wait leases.durationSeconds for a takeover" .Values.terminationGracePeriodSeconds .Values.shutdownGraceSeconds) }}
{{- end }}
{{- $restrict := .Values.permissions.operator.restrict }}
{{- if and $restrict.namesAllowList (not $restrict.secret) }}
{{- include "jobrunner.refuse" (printf "permissions.operator.restrict.namesAllowList (%s) narrows nothing while permissions.operator.restrict.secret is false: the operator may get every Secret by name then; set restrict.secret=true to allow only these" (join ", " $restrict.namesAllowList)) }}
{{- end }}
{{- $replicas := int .Values.replicaCount }}
{{- if .Values.podDisruptionBudget.enabled }}
{{- $max := toString .Values.podDisruptionBudget.maxUnavailable }}
{{- if or (eq $max "0") (eq $max "0%") }}
{{- include "jobrunner.refuse" (printf "podDisruptionBudget.maxUnavailable (%s) must allow at least one eviction: 0 blocks `kubectl drain` of every node running a replica forever; use 1 (or a percentage above 0%%), or podDisruptionBudget.enabled=false" $max) }}
{{- end }}
{{- /* The disruption controller rounds a percentage of the replicas up (policy/v1). */}}
{{- $evictable := 0 }}
{{- if hasSuffix "%" $max }}
{{- $evictable = int (ceil (divf (mulf (float64 (trimSuffix "%" $max)) $replicas) 100.0)) }}
{{- else }}
{{- $evictable = int $max }}
{{- end }}
{{- $most := max 1 (sub $replicas 1) }}
{{- if and (gt $replicas 0) (gt $evictable $most) }}
{{- include "jobrunner.refuse" (printf "podDisruptionBudget.maxUnavailable (%s) lets a drain evict %d pod(s) at once, every one of the %d replica(s), leaving none to take their ScaledJobs over; use at most %d (replicaCount - 1, and at least 1), or podDisruptionBudget.enabled=false" $max $evictable $replicas $most) }}
{{- end }}
{{- end }}
{{- if lt (int .Values.leases.buckets) $replicas }}
{{- include "jobrunner.refuse" (printf "leases.buckets (%v) must be at least replicaCount (%d): a replica serves the ScaledJobs of the buckets it holds, one holder each, so %d replica(s) would hold none and serve nothing; raise leases.buckets (the default 16 suits up to 16 replicas)" .Values.leases.buckets $replicas (sub $replicas (int .Values.leases.buckets))) }}
{{- end }}
{{- with .Values.labelSelector }}
{{- /* labels.Parse's grammar (k8s.io/apimachinery/pkg/labels/selector.go): the operator
would list ScaledJobs with it and get 400 for good. */}}
{{- if not (regexMatch `^(\s*(!\s*([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?|([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?(\s*(=|==|!=)\s*([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?|\s+(in|notin)\s*\(\s*[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?(\s*,\s*([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?)*\s*\)|\s*(>|<)\s*[0-9]+)?)(\s*,\s*(!\s*([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?|([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?(\s*(=|==|!=)\s*([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?|\s+(in|notin)\s*\(\s*[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?(\s*,\s*([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?)*\s*\)|\s*(>|<)\s*[0-9]+)?))*\s*)?$` .) }}
{{- include "jobrunner.refuse" (printf "labelSelector %q is not a Kubernetes label selector (the API server answers 400 to every list with it): write comma-separated requirements such as team=media, team!=legacy, team in (a,b), team notin (c), !legacy" .) }}
{{- end }}
{{- end }}
{{- include "jobrunner.validateResources" .Values.resources }}
{{- end }}

{{/* resources: each value a Kubernetes quantity (resource.Quantity's syntax), and each
request at most its limit: otherwise the Deployment installs and its ReplicaSet can never
create a pod (the API server refuses the pod: "must be less than or equal to ... limit"). */}}
{{- define "jobrunner.validateResources" -}}
{{- $limits := .limits | default dict }}
{{- range $kind, $set := pick . "requests" "limits" }}
{{- range $name, $value := $set }}
{{- if not (regexMatch `^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE][-+]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$` (toString $value)) }}
{{- include "jobrunner.refuse" (printf "resources.%s.%s (%v) is not a Kubernetes quantity: write e.g. 128Mi, 1Gi, 100m or 0.5" $kind $name $value) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $name, $request := .requests | default dict }}
{{- if hasKey $limits $name }}
{{- $limit := index $limits $name }}
{{- if gt (float64 (include "jobrunner.quantity" $request)) (float64 (include "jobrunner.quantity" $limit)) }}
{{- include "jobrunner.refuse" (printf "resources.requests.%s (%v) exceeds resources.limits.%s (%v): Kubernetes refuses such a pod, so the Deployment would never get one; lower the request or raise the limit" $name $request $name $limit) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* A quantity (already checked) as a plain number: its digits times its suffix's
multiplier (binary Ki..Ei, decimal n..E; an exponent is in the digits). */}}
{{- define "jobrunner.quantity" -}}
{{- $text := toString . }}
{{- $digits := regexFind `^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+))?` $text }}
{{- $suffix := trimPrefix $digits $text }}
{{- $scale := dict "" 1.0 "n" 0.000000001 "u" 0.000001 "m" 0.001 "k" 1000.0 "M" 1000000.0 "G" 1000000000.0 "T" 1000000000000.0 "P" 1000000000000000.0 "E" 1000000000000000000.0 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 }}
{{- mulf (float64 (trimPrefix "+" $digits)) (get $scale $suffix) }}
{{- end }}

{{/* Refuse the values with a message. `fail` stops `helm template` and `helm install`;
`helm lint` renders with `fail` made lenient (an [INFO] log line, no error, exit 0), so
then the include of a template that does not exist, named after the message, is the
error lint reports (`[ERROR] templates/: ... no template "values refused: ..."`). */}}
{{- define "jobrunner.refuse" -}}
{{- fail . }}
{{- include (printf "values refused: %s" .) . }}
{{- end }}
