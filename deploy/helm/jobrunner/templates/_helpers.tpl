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
{{- if .Values.podDisruptionBudget.enabled }}
{{- $max := toString .Values.podDisruptionBudget.maxUnavailable }}
{{- if or (eq $max "0") (eq $max "0%") }}
{{- include "jobrunner.refuse" (printf "podDisruptionBudget.maxUnavailable (%s) must allow at least one eviction: 0 blocks `kubectl drain` of every node running a replica forever; use 1 (or a percentage above 0%%), or podDisruptionBudget.enabled=false" $max) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Refuse the values with a message. `fail` stops `helm template` and `helm install`;
`helm lint` renders with `fail` made lenient (an [INFO] log line, no error, exit 0), so
then the include of a template that does not exist, named after the message, is the
error lint reports (`[ERROR] templates/: ... no template "values refused: ..."`). */}}
{{- define "jobrunner.refuse" -}}
{{- fail . }}
{{- include (printf "values refused: %s" .) . }}
{{- end }}
