{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "mmar-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: release-chart, unless the release name already contains it. */}}
{{- define "mmar-operator.fullname" -}}
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

{{- define "mmar-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mmar-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mmar-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mmar-operator.labels" -}}
helm.sh/chart: {{ include "mmar-operator.chart" . }}
{{ include "mmar-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mmar
{{- end }}

{{- define "mmar-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mmar-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mmar-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "mmar-operator.runtimeImage" -}}
{{- printf "%s:%s" .Values.runtime.image.repository (default .Chart.AppVersion .Values.runtime.image.tag) }}
{{- end }}

{{- define "mmar-operator.tensorboardImage" -}}
{{- if .Values.tensorboard.image.repository }}
{{- printf "%s:%s" .Values.tensorboard.image.repository (default .Chart.AppVersion .Values.tensorboard.image.tag) }}
{{- else }}
{{- include "mmar-operator.runtimeImage" . }}
{{- end }}
{{- end }}

{{/* Namespaces whose step pods the PodMonitor scrapes: its own list, else watchNamespaces. */}}
{{- define "mmar-operator.podMonitorNamespaces" -}}
{{- if .Values.metrics.podMonitor.namespaces }}
{{- toJson .Values.metrics.podMonitor.namespaces }}
{{- else }}
{{- toJson .Values.operator.watchNamespaces }}
{{- end }}
{{- end }}
