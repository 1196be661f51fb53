{{/* Names, labels, the shared pod spec and the values checks of the atproto-backfill chart. */}}

{{- define "atproto-backfill.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "atproto-backfill.fullname" -}}
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

{{- define "atproto-backfill.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "atproto-backfill.selectorLabels" -}}
app.kubernetes.io/name: {{ include "atproto-backfill.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "atproto-backfill.labels" -}}
helm.sh/chart: {{ include "atproto-backfill.chart" . }}
{{ include "atproto-backfill.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: atproto-backfill
{{- end }}

{{/* Labels of one component: (dict "root" $ "component" "consumer-postgres"). */}}
{{- define "atproto-backfill.componentLabels" -}}
{{ include "atproto-backfill.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "atproto-backfill.componentSelector" -}}
{{ include "atproto-backfill.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "atproto-backfill.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "atproto-backfill.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "atproto-backfill.secretName" -}}
{{- default (include "atproto-backfill.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "atproto-backfill.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* KEDA's name for a SASL mechanism. */}}
{{- define "atproto-backfill.kedaSasl" -}}
{{- $m := .Values.kafka.saslMechanism }}
{{- if eq $m "PLAIN" }}plaintext{{ else if eq $m "SCRAM-SHA-256" }}scram_sha256{{ else if eq $m "SCRAM-SHA-512" }}scram_sha512{{ end }}
{{- end }}

{{- define "atproto-backfill.tlsEnabled" -}}
{{- if has .Values.kafka.securityProtocol (list "SSL" "SASL_SSL") }}true{{ end }}
{{- end }}

{{/*
The pod template of every workload. Arguments (a dict):
  root       the chart context ($)
  component  component name (label and container name suffix)
  args       the `backfill` arguments
  comp       the component's values (env, resources, terminationGracePeriodSeconds)
  database   true to give the container DATABASE_URL from the Secret
  readiness  false to leave out the readiness probe (Jobs)
  restartPolicy  optional (Jobs)
  volumes / mounts  optional extra volumes and mounts
*/}}
{{- define "atproto-backfill.podTemplate" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $secret := include "atproto-backfill.secretName" $root -}}
metadata:
  labels:
    {{- include "atproto-backfill.componentLabels" (dict "root" $root "component" .component) | nindent 4 }}
  annotations:
    checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
    checksum/secret: {{ include (print $root.Template.BasePath "/secret.yaml") $root | sha256sum }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "atproto-backfill.serviceAccountName" $root }}
  automountServiceAccountToken: false
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .restartPolicy }}
  restartPolicy: {{ . }}
  {{- end }}
  terminationGracePeriodSeconds: {{ .comp.terminationGracePeriodSeconds }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  containers:
    - name: backfill
      image: {{ include "atproto-backfill.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      args:
        {{- toYaml .args | nindent 8 }}
      envFrom:
        - configMapRef:
            name: {{ include "atproto-backfill.fullname" $root }}
      {{- $needsSasl := ne $v.kafka.saslMechanism "" }}
      {{- if or $needsSasl $v.schemaRegistry.basicAuth .database .comp.env }}
      env:
        {{- if $needsSasl }}
        - name: KAFKA_SASL_USERNAME
          valueFrom:
            secretKeyRef:
              name: {{ $secret }}
              key: {{ $v.secrets.keys.kafkaSaslUsername }}
        - name: KAFKA_SASL_PASSWORD
          valueFrom:
            secretKeyRef:
              name: {{ $secret }}
              key: {{ $v.secrets.keys.kafkaSaslPassword }}
        {{- end }}
        {{- if $v.schemaRegistry.basicAuth }}
        - name: SCHEMA_REGISTRY_BASIC_AUTH
          valueFrom:
            secretKeyRef:
              name: {{ $secret }}
              key: {{ $v.secrets.keys.schemaRegistryBasicAuth }}
        {{- end }}
        {{- if .database }}
        - name: DATABASE_URL
          valueFrom:
            secretKeyRef:
              name: {{ $secret }}
              key: {{ $v.secrets.keys.databaseUrl }}
        {{- end }}
        {{- range $name, $value := .comp.env }}
        - name: {{ $name }}
          value: {{ $value | toString | quote }}
        {{- end }}
      {{- end }}
      ports:
        - name: metrics
          containerPort: {{ $v.metrics.port }}
          protocol: TCP
      livenessProbe:
        httpGet:
          path: /healthz
          port: metrics
        {{- toYaml $v.probes.liveness | nindent 8 }}
      {{- if ne .readiness false }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: metrics
        {{- toYaml $v.probes.readiness | nindent 8 }}
      {{- end }}
      resources:
        {{- toYaml .comp.resources | nindent 8 }}
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: cache
          mountPath: /cache
        {{- if $v.kafka.tls.caSecret }}
        - name: kafka-ca
          mountPath: /etc/atproto-backfill/kafka-ca
          readOnly: true
        {{- end }}
        {{- with .mounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: 256Mi
    - name: cache
      emptyDir:
        sizeLimit: 64Mi
    {{- if $v.kafka.tls.caSecret }}
    - name: kafka-ca
      secret:
        secretName: {{ $v.kafka.tls.caSecret }}
        items:
          - key: {{ $v.kafka.tls.caKey }}
            path: {{ $v.kafka.tls.caKey }}
    {{- end }}
    {{- with .volumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $v.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* `--collections` arguments of a consumer. */}}
{{- define "atproto-backfill.collectionArgs" -}}
{{- range . }}
- --collections
- {{ . | quote }}
{{- end }}
{{- end }}

{{/*
Checks the schema cannot express: replica counts bounded by the partitions (a consumer group never
uses more members than partitions), credentials present where needed.
*/}}
{{- define "atproto-backfill.validate" -}}
{{- $v := .Values }}
{{- $parts := int $v.kafka.topicPartitions }}
{{- $pg := $v.consumers.postgres }}
{{- if $pg.enabled }}
{{- if and $pg.autoscaling.hpa.enabled $pg.autoscaling.keda.enabled }}
{{- fail "consumers.postgres.autoscaling: enable at most one of hpa and keda (two autoscalers would fight over one Deployment)" }}
{{- end }}
{{- if $pg.autoscaling.hpa.enabled }}
{{- if gt (int $pg.autoscaling.hpa.maxReplicas) $parts }}
{{- fail (printf "consumers.postgres.autoscaling.hpa.maxReplicas (%d) exceeds kafka.topicPartitions (%d): extra consumers would sit idle" (int $pg.autoscaling.hpa.maxReplicas) $parts) }}
{{- end }}
{{- if gt (int $pg.autoscaling.hpa.minReplicas) (int $pg.autoscaling.hpa.maxReplicas) }}
{{- fail "consumers.postgres.autoscaling.hpa.minReplicas exceeds maxReplicas" }}
{{- end }}
{{- else if $pg.autoscaling.keda.enabled }}
{{- if gt (int $pg.autoscaling.keda.maxReplicaCount) $parts }}
{{- fail (printf "consumers.postgres.autoscaling.keda.maxReplicaCount (%d) exceeds kafka.topicPartitions (%d): extra consumers would sit idle" (int $pg.autoscaling.keda.maxReplicaCount) $parts) }}
{{- end }}
{{- if gt (int $pg.autoscaling.keda.minReplicaCount) (int $pg.autoscaling.keda.maxReplicaCount) }}
{{- fail "consumers.postgres.autoscaling.keda.minReplicaCount exceeds maxReplicaCount" }}
{{- end }}
{{- else if gt (int $pg.replicas) $parts }}
{{- fail (printf "consumers.postgres.replicas (%d) exceeds kafka.topicPartitions (%d): extra consumers would sit idle" (int $pg.replicas) $parts) }}
{{- end }}
{{- if and (not $v.secrets.existingSecret) (not $v.secrets.databaseUrl) }}
{{- fail "consumers.postgres needs a database: set secrets.databaseUrl or secrets.existingSecret" }}
{{- end }}
{{- end }}
{{- if and $v.repos.enabled (gt (int $v.repos.replicas) $parts) }}
{{- fail (printf "repos.replicas (%d) exceeds kafka.topicPartitions (%d): extra workers would sit idle" (int $v.repos.replicas) $parts) }}
{{- end }}
{{- if and $v.kafka.saslMechanism (not $v.secrets.existingSecret) (or (not $v.secrets.kafkaSaslUsername) (not $v.secrets.kafkaSaslPassword)) }}
{{- fail "kafka.saslMechanism needs secrets.kafkaSaslUsername and secrets.kafkaSaslPassword, or secrets.existingSecret" }}
{{- end }}
{{- if and $v.kafka.saslMechanism (not (has $v.kafka.securityProtocol (list "SASL_PLAINTEXT" "SASL_SSL"))) }}
{{- fail "kafka.saslMechanism needs kafka.securityProtocol SASL_PLAINTEXT or SASL_SSL" }}
{{- end }}
{{- if and $v.schemaRegistry.basicAuth (not $v.secrets.existingSecret) (not $v.secrets.schemaRegistryBasicAuth) }}
{{- fail "schemaRegistry.basicAuth needs secrets.schemaRegistryBasicAuth or secrets.existingSecret" }}
{{- end }}
{{- $names := dict }}
{{- range $v.backfillJobs }}
{{- if hasKey $names .name }}
{{- fail (printf "backfillJobs: the name %q is used twice" .name) }}
{{- end }}
{{- $_ := set $names .name true }}
{{- end }}
{{- end }}
