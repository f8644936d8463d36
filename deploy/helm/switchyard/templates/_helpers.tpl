{{- define "switchyard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "switchyard.labels" -}}
k8s-app: {{ include "switchyard.name" . }}
app.kubernetes.io/name: {{ include "switchyard.name" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "switchyard.selector" -}}
k8s-app: {{ include "switchyard.name" . }}
{{- end -}}

{{- define "switchyard.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The configuration file: an optional KubeProxyConfiguration, then Switchyard's own. */}}
{{- define "switchyard.config" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $_ := set $cfg "healthzBindAddress" (printf "0.0.0.0:%d" (int .Values.healthzPort)) -}}
{{- $_ := set $cfg "metricsBindAddress" (printf "0.0.0.0:%d" (int .Values.metricsPort)) -}}
{{- if .Values.interfaces }}{{ $_ := set $cfg "interfaces" .Values.interfaces }}{{ end -}}
{{- $_ := set $cfg "dns" (deepCopy .Values.dns) -}}
{{- if .Values.kubeProxyConfiguration -}}
{{- $kp := deepCopy .Values.kubeProxyConfiguration -}}
{{- /* What the KubeProxyConfiguration sets is kube-proxy's to say: the chart's own defaults of the same names give way. */ -}}
{{- range $k, $_ := $kp }}{{ $_ := unset $cfg $k }}{{ end -}}
{{- $_ := set $kp "apiVersion" "kubeproxy.config.k8s.io/v1alpha1" -}}
{{- $_ := set $kp "kind" "KubeProxyConfiguration" -}}
{{- $_ := set $cfg "apiVersion" "switchyard.io/v1alpha1" -}}
{{- $_ := set $cfg "kind" "SwitchyardConfiguration" -}}
{{ toYaml $kp }}
---
{{ toYaml $cfg }}
{{- else -}}
{{ toYaml $cfg }}
{{- end -}}
{{- end -}}

{{/* The capabilities the daemon needs, and why (tests/tests/capabilities.rs runs it with exactly these). */}}
{{- define "switchyard.securityContext" -}}
privileged: false
capabilities:
  drop: [ALL]
  add: {{ concat (list "NET_ADMIN" "BPF" "PERFMON" "NET_RAW" "NET_BIND_SERVICE" "SYS_MODULE") (ternary (list "SYS_ADMIN") (list) .Values.podSocketTermination) .Values.extraCapabilities | toJson }}
{{- end -}}
