{{/* Chart name. */}}
{{- define "mailcluster-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: RELEASE-mailcluster-operator, or RELEASE when it already contains the name. */}}
{{- define "mailcluster-operator.fullname" -}}
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

{{- define "mailcluster-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mailcluster-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mailcluster-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mailcluster-operator.labels" -}}
helm.sh/chart: {{ include "mailcluster-operator.chart" . }}
{{ include "mailcluster-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: mailcluster
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "mailcluster-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mailcluster-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mailcluster-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* "true" when the replicas elect a leader: always with more than one replica. */}}
{{- define "mailcluster-operator.leaderElect" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicaCount) 1) }}true{{ else }}false{{ end }}
{{- end }}

{{- define "mailcluster-operator.leaseName" -}}
{{- default (include "mailcluster-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}
