{{- define "bitsmith.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "bitsmith.fullname" -}}
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

{{- define "bitsmith.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bitsmith.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "bitsmith.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "bitsmith.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "bitsmith.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "bitsmith.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The controller's identity, as RBAC subjects. */}}
{{- define "bitsmith.subjects" -}}
- kind: ServiceAccount
  name: {{ include "bitsmith.serviceAccountName" . }}
  namespace: {{ .Release.Namespace }}
{{- end }}

{{- define "bitsmith.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* "true" when the store is a directory on a volume. */}}
{{- define "bitsmith.fileStore" -}}
{{- if hasPrefix "file://" .Values.store.url }}true{{ end }}
{{- end }}

{{- define "bitsmith.storePath" -}}
{{- trimPrefix "file://" .Values.store.url }}
{{- end }}

{{- define "bitsmith.claimName" -}}
{{- default (printf "%s-store" (include "bitsmith.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{/* The Secret holding the API's serving certificate. */}}
{{- define "bitsmith.tlsSecretName" -}}
{{- if eq .Values.tls.source "secret" }}
{{- .Values.tls.existingSecret }}
{{- else }}
{{- printf "%s-tls" (include "bitsmith.fullname" .) }}
{{- end }}
{{- end }}

{{/* The Service's DNS names, which the serving certificate names. */}}
{{- define "bitsmith.serviceHosts" -}}
{{- $svc := include "bitsmith.fullname" . }}
{{- list $svc (printf "%s.%s" $svc .Release.Namespace) (printf "%s.%s.svc" $svc .Release.Namespace) (printf "%s.%s.svc.cluster.local" $svc .Release.Namespace) | toJson }}
{{- end }}

{{- define "bitsmith.externalURL" -}}
{{- if .Values.api.externalURL }}
{{- .Values.api.externalURL }}
{{- else }}
{{- $url := printf "https://%s.%s.svc" (include "bitsmith.fullname" .) .Release.Namespace }}
{{- if ne (int .Values.service.port) 443 }}{{ $url = printf "%s:%d" $url (int .Values.service.port) }}{{ end }}
{{- $url }}
{{- end }}
{{- end }}
