{{/*
The chart name.
*/}}
{{- define "comind.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name that every resource name starts with: RELEASE-comind, or the
release name alone when it already contains the chart name.
*/}}
{{- define "comind.fullname" -}}
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

{{/*
The name of a component's resources: FULLNAME-ps, FULLNAME-worker. The full
name is cut to 45 characters because a StatefulSet's name, plus the hash
that Kubernetes appends for its controller-revision-hash label, must fit in
63. Takes (dict "root" $ "component" "ps").
*/}}
{{- define "comind.componentName" -}}
{{- printf "%s-%s" (include "comind.fullname" .root | trunc 45 | trimSuffix "-") .component }}
{{- end }}

{{- define "comind.psName" -}}
{{- include "comind.componentName" (dict "root" . "component" "ps") }}
{{- end }}

{{- define "comind.workerName" -}}
{{- include "comind.componentName" (dict "root" . "component" "worker") }}
{{- end }}

{{- /* The chief's Job (lifecycle train): worker 0, which writes the outputs. */}}
{{- define "comind.chiefName" -}}
{{- include "comind.componentName" (dict "root" . "component" "chief") }}
{{- end }}

{{- /* The claim that the chief writes its outputs to (lifecycle train). */}}
{{- define "comind.outputClaimName" -}}
{{- include "comind.componentName" (dict "root" . "component" "output") }}
{{- end }}

{{/*
How a Job (lifecycle train) treats its pods' ends. Exit 0 after the last
round completes it. Exit 2 is a bad setting, said in one line at start: a
retry would fail the same way, so the Job fails at once. An eviction, a
preemption or a drained node (the DisruptionTarget condition) is no fault of
the process: its replacement costs no retry. Any other failure (a crash, an
out-of-memory kill, a failed liveness probe) is retried in a new pod, up to
backoffLimit times: the ps resumes from its checkpoint, a worker rejoins.
Takes (dict "container" "ps" "backoffLimit" .Values.ps.backoffLimit).
*/}}
{{- define "comind.jobPolicy" -}}
backoffLimit: {{ .backoffLimit }}
podFailurePolicy:
  rules:
    - action: FailJob
      onExitCodes:
        containerName: {{ .container }}
        operator: In
        values: [2]
      # Empty, yet required by the schema of Kubernetes 1.28.
      onPodConditions: []
    - action: Ignore
      onPodConditions:
        - type: DisruptionTarget
          status: "True"
{{- end }}

{{/*
The ps's headless Service, which gives its pod a stable DNS name.
*/}}
{{- define "comind.psHeadlessName" -}}
{{- include "comind.psName" . }}-headless
{{- end }}

{{/*
Where the workers find the ps: the client Service's short name, which
resolves in the release's namespace and is one of the ps certificate's names.
*/}}
{{- define "comind.psAddress" -}}
{{- printf "%s:%d" (include "comind.psName" .) (int .Values.ps.port) }}
{{- end }}

{{/*
Every DNS name of the ps: the client Service's and the ps pod's, short and
qualified. The ps certificate carries them all.
*/}}
{{- define "comind.psDnsNames" -}}
{{- $names := list }}
{{- $pod := printf "%s-0.%s" (include "comind.psName" .) (include "comind.psHeadlessName" .) }}
{{- range $host := list (include "comind.psName" .) $pod }}
{{- $qualified := printf "%s.%s" $host $.Release.Namespace }}
{{- $names = concat $names (list $host $qualified (printf "%s.svc" $qualified) (printf "%s.svc.%s" $qualified $.Values.clusterDomain)) }}
{{- end }}
{{- toYaml $names }}
{{- end }}

{{- define "comind.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: name and instance, plus the component (ps, worker, test)
where there is one, so that the ps Service never selects a worker.
Takes (dict "root" $ "component" "ps"); the component may be left out.
*/}}
{{- define "comind.selectorLabels" -}}
app.kubernetes.io/name: {{ include "comind.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{/*
Labels of every resource. Takes what comind.selectorLabels takes.
*/}}
{{- define "comind.labels" -}}
helm.sh/chart: {{ include "comind.chart" .root }}
{{ include "comind.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}

{{- define "comind.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "comind.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "comind.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "comind.tokenSecretName" -}}
{{- default (printf "%s-token" (include "comind.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "comind.tlsSecretName" -}}
{{- if .Values.tls.existingSecret }}
{{- .Values.tls.existingSecret }}
{{- else if .Values.tls.certManager.enabled }}
{{- include "comind.psName" . }}-tls
{{- else }}
{{- fail "tls.enabled needs a certificate for the ps: set tls.existingSecret, or tls.certManager.enabled with tls.certManager.issuerRef.name" }}
{{- end }}
{{- end }}

{{- define "comind.tlsClientSecretName" -}}
{{- if .Values.tls.existingClientSecret }}
{{- .Values.tls.existingClientSecret }}
{{- else if .Values.tls.certManager.enabled }}
{{- include "comind.workerName" . }}-tls
{{- else }}
{{- fail "tls.mutual needs the workers' client certificate: set tls.existingClientSecret, or tls.certManager.enabled" }}
{{- end }}
{{- end }}

{{/*
Where the token and certificates are mounted: the same paths on the ps and
the workers.
*/}}
{{- define "comind.tokenDir" -}}/etc/comind/token{{- end }}
{{- define "comind.tlsDir" -}}/etc/comind/tls{{- end }}

{{/*
Pod annotations of the ps and the workers: a checksum of the shared settings,
so that changing them restarts the pods, and Prometheus's scrape annotations.
Takes (dict "root" $ "extra" .Values.ps.podAnnotations).
*/}}
{{- define "comind.podAnnotations" -}}
checksum/config: {{ include (print .root.Template.BasePath "/configmap.yaml") .root | sha256sum }}
{{- if .root.Values.metrics.scrapeAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .root.Values.metrics.port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
`NAME: value` maps (extraEnv) as a container's env list.
*/}}
{{- define "comind.envList" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/*
The TLS settings of a role. The ps presents its certificate and, for mutual
TLS, checks the workers' against the CA; a worker checks the ps's against
the CA and, for mutual TLS, presents its own. Takes (dict "root" $ "role" "ps").
*/}}
{{- define "comind.tlsEnv" -}}
{{- $tls := .root.Values.tls }}
{{- if $tls.enabled }}
{{- if or (eq .role "ps") $tls.mutual }}
- name: COMIND_TLS_CERT
  value: {{ include "comind.tlsDir" . }}/tls.crt
- name: COMIND_TLS_KEY
  value: {{ include "comind.tlsDir" . }}/tls.key
{{- end }}
{{- if or (eq .role "worker") $tls.mutual }}
- name: COMIND_TLS_CA
  value: {{ include "comind.tlsDir" . }}/ca.crt
{{- end }}
{{- end }}
{{- end }}

{{/*
The pod-level settings that the ps and the workers share: service account,
security context, grace period, image pull secrets and scheduling.
Takes (dict "root" $ "pod" .Values.ps).
*/}}
{{- define "comind.podSpec" -}}
serviceAccountName: {{ include "comind.serviceAccountName" .root }}
# Neither the ps nor a worker calls the Kubernetes API.
automountServiceAccountToken: false
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ .pod.terminationGracePeriodSeconds }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .pod.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .pod.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .pod.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The container fields that the ps and the workers share: image, the shared
settings, probes and resources. Takes (dict "root" $ "pod" .Values.ps).
*/}}
{{- define "comind.container" -}}
image: {{ include "comind.image" .root }}
imagePullPolicy: {{ .root.Values.image.pullPolicy }}
securityContext:
  {{- toYaml .root.Values.securityContext | nindent 2 }}
envFrom:
  - configMapRef:
      name: {{ include "comind.fullname" .root }}
{{- range $probe := list "startupProbe" "readinessProbe" "livenessProbe" }}
{{- with index $.pod $probe }}
{{ $probe }}:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
resources:
  {{- toYaml .pod.resources | nindent 2 }}
{{- end }}

{{/*
The volume mounts that the ps and the workers share: /tmp (the root file
system is read-only), the token and the certificates.
*/}}
{{- define "comind.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.auth.enabled }}
- name: token
  mountPath: {{ include "comind.tokenDir" . }}
  readOnly: true
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: {{ include "comind.tlsDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
The volumes behind comind.volumeMounts. The ps gets its own certificate; a
worker only the CA from the ps's Secret (never the ps's key) and, for mutual
TLS, its client certificate. Takes (dict "root" $ "role" "ps").
*/}}
{{- define "comind.volumes" -}}
{{- $root := .root -}}
- name: tmp
  emptyDir: {}
{{- if $root.Values.auth.enabled }}
- name: token
  secret:
    secretName: {{ include "comind.tokenSecretName" $root }}
    items:
      - key: {{ $root.Values.auth.secretKey }}
        path: token
{{- end }}
{{- if $root.Values.tls.enabled }}
- name: tls
  projected:
    sources:
      {{- if eq .role "ps" }}
      - secret:
          name: {{ include "comind.tlsSecretName" $root }}
      {{- else }}
      - secret:
          name: {{ include "comind.tlsSecretName" $root }}
          items:
            - key: ca.crt
              path: ca.crt
      {{- if $root.Values.tls.mutual }}
      - secret:
          name: {{ include "comind.tlsClientSecretName" $root }}
          items:
            - key: tls.crt
              path: tls.crt
            - key: tls.key
              path: tls.key
      {{- end }}
      {{- end }}
{{- end }}
{{- end }}

{{/*
A claim's spec from a persistence value (size, storage class, access modes).
*/}}
{{- define "comind.claimSpec" -}}
accessModes:
  {{- toYaml .accessModes | nindent 2 }}
{{- with .storageClass }}
storageClassName: {{ . }}
{{- end }}
resources:
  requests:
    storage: {{ .size }}
{{- end }}

{{/*
A StatefulSet's claim template, from a persistence value. Takes (dict "root"
$ "component" "ps" "name" "checkpoints" "persistence" .Values.ps.persistence).
*/}}
{{- define "comind.volumeClaimTemplate" -}}
- metadata:
    name: {{ .name }}
    labels:
      {{- include "comind.selectorLabels" . | nindent 6 }}
  spec:
    {{- include "comind.claimSpec" .persistence | nindent 4 }}
{{- end }}

{{/*
The NetworkPolicy ingress rule for scrapes: from networkPolicy.metricsFrom,
or from anyone when it is empty. The `helm test` pod reads the ps's metrics,
so the ps's rule also admits it. Takes (dict "root" $ "component" "ps").
*/}}
{{- define "comind.metricsIngress" -}}
- ports:
    - port: metrics
  {{- with .root.Values.networkPolicy.metricsFrom }}
  from:
    {{- toYaml . | nindent 4 }}
    {{- if eq $.component "ps" }}
    - podSelector:
        matchLabels:
          {{- include "comind.selectorLabels" (dict "root" $.root "component" "test") | nindent 10 }}
    {{- end }}
  {{- end }}
{{- end }}

{{/*
The pod that NOTES.txt's `kubectl run --overrides` starts to copy the chief's
outputs from their claim (lifecycle train): the image's user, the restricted
profile, the claim read-only at /output. One line of JSON.
*/}}
{{- define "comind.outputPod" -}}
{{- $name := include "comind.outputClaimName" . }}
{{- $container := dict "name" $name "image" (include "comind.image" .) "command" (list "sleep" "3600")
      "securityContext" .Values.securityContext
      "resources" (dict "requests" (dict "cpu" "10m" "memory" "16Mi") "limits" (dict "memory" "64Mi"))
      "volumeMounts" (list (dict "name" "output" "mountPath" "/output" "readOnly" true)) }}
{{- $spec := dict "securityContext" .Values.podSecurityContext "automountServiceAccountToken" false
      "containers" (list $container)
      "volumes" (list (dict "name" "output" "persistentVolumeClaim" (dict "claimName" $name "readOnly" true))) }}
{{- dict "apiVersion" "v1" "spec" $spec | toJson }}
{{- end }}
