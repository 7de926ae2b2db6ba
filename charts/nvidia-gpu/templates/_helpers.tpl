{{- define "aiodp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "aiodp.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "aiodp.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride -}}
{{- end -}}

{{- define "aiodp.selectorLabels" -}}
{{- if .Values.selectorLabelsOverride -}}
{{ toYaml .Values.selectorLabelsOverride }}
{{- else -}}
app.kubernetes.io/name: {{ include "aiodp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- end -}}

{{- define "aiodp.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "aiodp.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Several named configs (an external ConfigMap, or more than one inline): per-node choice. */}}
{{/* Whether the plugin talks to the API: per-node configs or node signals. */}}
{{- define "aiodp.apiAccess" -}}
{{- if or (include "aiodp.perNode" .) .Values.nodeSignals.enabled .Values.dra.enabled .Values.gfd.enabled -}}true{{- end -}}
{{- end -}}

{{- define "aiodp.perNode" -}}
{{- if or .Values.config.name (gt (len (keys .Values.config.map)) 1) -}}true{{- end -}}
{{- end -}}

{{/* The ConfigMap holding the config files, if any. */}}
{{- define "aiodp.configMapName" -}}
{{- if .Values.config.name -}}
{{- .Values.config.name -}}
{{- else if .Values.config.map -}}
{{- printf "%s-configs" (include "aiodp.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The key of the config file used: config.default, the only key of config.map, or "default". */}}
{{- define "aiodp.configKey" -}}
{{- if .Values.config.default -}}
{{- .Values.config.default -}}
{{- else if eq (len (keys .Values.config.map)) 1 -}}
{{- keys .Values.config.map | first -}}
{{- else if or (not .Values.config.map) (hasKey .Values.config.map "default") -}}
default
{{- else -}}
{{- fail (printf "config.map has %d configs (%s) and none is named \"default\": set config.default to the one to use" (len (keys .Values.config.map)) (keys .Values.config.map | sortAlpha | join ", ")) -}}
{{- end -}}
{{- end -}}

{{/* An env var only when the value is set (NVIDIA's typeIs guard): the program's default
stays the only default. Renders container env list items indented for daemonset.yaml. */}}
{{- define "aiodp.env" -}}
{{- $name := index . 0 -}}
{{- $value := index . 1 -}}
{{- if or (typeIs "bool" $value) (typeIs "string" $value) (typeIs "float64" $value) (typeIs "int" $value) (typeIs "int64" $value) }}
            - name: {{ $name }}
              value: {{ $value | toString | quote }}
{{- else if typeIs "[]interface {}" $value }}
            - name: {{ $name }}
              value: {{ join "," $value | quote }}
{{- end }}
{{- end -}}

{{/* The DRA driver name: NVIDIA's with dra.compat=nvidia (claims written for its driver). */}}
{{- define "aiodp.draDriver" -}}
{{- if eq (toString .Values.dra.compat) "nvidia" -}}gpu.nvidia.com{{- else -}}{{ .Values.dra.driverName }}{{- end -}}
{{- end -}}
