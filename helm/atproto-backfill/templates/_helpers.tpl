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

{{/* Labels that never change across upgrades (pod templates of Jobs, whose template is immutable). */}}
{{- define "atproto-backfill.stableLabels" -}}
{{ include "atproto-backfill.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: atproto-backfill
{{- end }}

{{- define "atproto-backfill.labels" -}}
helm.sh/chart: {{ include "atproto-backfill.chart" . }}
{{ include "atproto-backfill.stableLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
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
{{- $img := .Values.image }}
{{- if not $img.repository }}
{{- fail "image.repository is required: no public registry publishes this image. Build it from the repository's Dockerfile (docker build -t REGISTRY/atproto-backfill:TAG .), push it, and set image.repository (and image.tag or image.digest)" }}
{{- end }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) }}
{{- end }}
{{- end }}

{{/* KEDA's name for a SASL mechanism. */}}
{{- define "atproto-backfill.kedaSasl" -}}
{{- $m := .Values.kafka.saslMechanism }}
{{- if eq $m "PLAIN" }}plaintext{{ else if eq $m "SCRAM-SHA-256" }}scram_sha256{{ else if eq $m "SCRAM-SHA-512" }}scram_sha512{{ end }}
{{- end }}

{{- define "atproto-backfill.tlsEnabled" -}}
{{- if has .Values.kafka.securityProtocol (list "SSL" "SASL_SSL") }}true{{ end }}
{{- end }}

{{/* Where the brokers' CA and the client certificate are mounted. */}}
{{- define "atproto-backfill.caDir" -}}/etc/atproto-backfill/kafka-ca{{- end }}
{{- define "atproto-backfill.clientCertDir" -}}/etc/atproto-backfill/kafka-client{{- end }}

{{/*
BACKFILL_KAFKA_CONFIG: the librdkafka settings of every client. message.max.bytes follows
kafka.maxMessageBytes (the producers' own default is 4 MiB, above what most brokers accept), the
client certificate comes from kafka.tls.clientCertSecret, the rest from kafka.clientConfig.
*/}}
{{- define "atproto-backfill.kafkaConfig" -}}
{{- $k := .Values.kafka }}
{{- $conf := dict "message.max.bytes" (toString (int $k.maxMessageBytes)) }}
{{- if $k.tls.clientCertSecret }}
{{- $_ := set $conf "ssl.certificate.location" (printf "%s/%s" (include "atproto-backfill.clientCertDir" .) $k.tls.certKey) }}
{{- $_ := set $conf "ssl.key.location" (printf "%s/%s" (include "atproto-backfill.clientCertDir" .) $k.tls.keyKey) }}
{{- end }}
{{- range $key, $value := $k.clientConfig }}
{{- $_ := set $conf $key (toString $value) }}
{{- end }}
{{- $items := list }}
{{- range $key, $value := $conf }}
{{- $items = append $items (printf "%s=%s" $key $value) }}
{{- end }}
{{- join "," $items }}
{{- end }}

{{/* A memory quantity (2Gi, 1536Mi, 2G, 2147483648) in whole MiB. */}}
{{- define "atproto-backfill.memoryMiB" -}}
{{- $q := toString . }}
{{- $num := regexFind "^[0-9]+([.][0-9]+)?" $q }}
{{- $unit := trimPrefix $num $q }}
{{- $factors := dict "" 1.0 "k" 1000.0 "M" 1000000.0 "G" 1000000000.0 "T" 1000000000000.0 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 }}
{{- if or (not $num) (not (hasKey $factors $unit)) }}
{{- fail (printf "cannot read the memory quantity %q: write it like 2Gi or 1536Mi" $q) }}
{{- end }}
{{- divf (mulf (float64 $num) (get $factors $unit)) 1048576.0 | floor | int }}
{{- end }}

{{/*
The memory guard of a consumer (BACKFILL_MAX_MEMORY_MB): memoryGuardPercent of its memory limit,
unless its env sets one. Empty when the env sets it (the env entry is rendered as is).
*/}}
{{- define "atproto-backfill.memoryGuard" -}}
{{- if not (hasKey (.env | default dict) "BACKFILL_MAX_MEMORY_MB") }}
{{- $limit := include "atproto-backfill.memoryMiB" .resources.limits.memory | int }}
{{- div (mul $limit (int .memoryGuardPercent)) 100 }}
{{- end }}
{{- end }}

{{/*
The parts of a container every workload, init container and test shares: image, environment,
security context and mounts. Arguments (a dict):
  root       the chart context ($)
  comp       the component's values (env)
  database   true to give the container DATABASE_URL from the Secret
  extraEnv   optional env entries (fieldRef and the like)
  memoryGuard  optional BACKFILL_MAX_MEMORY_MB
  mounts     optional extra volume mounts
*/}}
{{- define "atproto-backfill.containerBase" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $secret := include "atproto-backfill.secretName" $root -}}
image: {{ include "atproto-backfill.image" $root }}
imagePullPolicy: {{ $v.image.pullPolicy }}
envFrom:
  - configMapRef:
      name: {{ include "atproto-backfill.fullname" $root }}
{{- $needsSasl := ne $v.kafka.saslMechanism "" }}
{{- $compEnv := (.comp | default dict).env }}
{{- if or $needsSasl $v.schemaRegistry.basicAuth .database $compEnv .extraEnv .memoryGuard }}
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
  {{- with .memoryGuard }}
  - name: BACKFILL_MAX_MEMORY_MB
    value: {{ . | quote }}
  {{- end }}
  {{- with .extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  {{- range $name, $value := $compEnv }}
  - name: {{ $name }}
    value: {{ $value | toString | quote }}
  {{- end }}
{{- end }}
securityContext:
  {{- toYaml $v.securityContext | nindent 2 }}
volumeMounts:
  - name: tmp
    mountPath: /tmp
  - name: cache
    mountPath: /cache
  {{- if $v.kafka.tls.caSecret }}
  - name: kafka-ca
    mountPath: {{ include "atproto-backfill.caDir" $root }}
    readOnly: true
  {{- end }}
  {{- if $v.kafka.tls.clientCertSecret }}
  - name: kafka-client-cert
    mountPath: {{ include "atproto-backfill.clientCertDir" $root }}
    readOnly: true
  {{- end }}
  {{- with .mounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* The volumes behind containerBase's mounts, plus optional extra ones. */}}
{{- define "atproto-backfill.volumes" -}}
{{- $v := .root.Values -}}
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
{{- if $v.kafka.tls.clientCertSecret }}
- name: kafka-client-cert
  secret:
    secretName: {{ $v.kafka.tls.clientCertSecret }}
    defaultMode: 0440
    items:
      - key: {{ $v.kafka.tls.certKey }}
        path: {{ $v.kafka.tls.certKey }}
      - key: {{ $v.kafka.tls.keyKey }}
        path: {{ $v.kafka.tls.keyKey }}
{{- end }}
{{- with .volumes }}
{{ toYaml . }}
{{- end }}
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
  stable     true for Jobs: no label or annotation that changes with the chart or app version
  podLabels  optional extra pod labels
  extraEnv   optional env entries (fieldRef and the like)
  memoryGuard  optional BACKFILL_MAX_MEMORY_MB
  initArgs   optional: an init container "migrate" running `backfill <initArgs>` first
  volumes / mounts  optional extra volumes and mounts
*/}}
{{- define "atproto-backfill.podTemplate" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $base := dict "root" $root "comp" .comp "database" .database "extraEnv" .extraEnv "memoryGuard" .memoryGuard "mounts" .mounts -}}
metadata:
  labels:
    {{- if .stable }}
    {{- include "atproto-backfill.stableLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    {{- else }}
    {{- include "atproto-backfill.componentLabels" (dict "root" $root "component" .component) | nindent 4 }}
    {{- end }}
    {{- with .podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    {{- /* Checksums of the data only: a new chart version alone changes neither. */}}
    checksum/config: {{ (include (print $root.Template.BasePath "/configmap.yaml") $root | fromYaml).data | toYaml | sha256sum }}
    checksum/secret: {{ (include (print $root.Template.BasePath "/secret.yaml") $root | fromYaml).stringData | toYaml | sha256sum }}
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
  {{- with .initArgs }}
  initContainers:
    - name: migrate
      args:
        {{- toYaml . | nindent 8 }}
      {{- include "atproto-backfill.containerBase" $base | nindent 6 }}
      resources:
        {{- toYaml $.comp.resources | nindent 8 }}
  {{- end }}
  containers:
    - name: backfill
      args:
        {{- toYaml .args | nindent 8 }}
      {{- include "atproto-backfill.containerBase" $base | nindent 6 }}
      ports:
        - name: metrics
          containerPort: {{ $v.metrics.port }}
          protocol: TCP
      startupProbe:
        httpGet:
          path: /healthz
          port: metrics
        {{- toYaml $v.probes.startup | nindent 8 }}
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
  volumes:
    {{- include "atproto-backfill.volumes" (dict "root" $root "volumes" .volumes) | nindent 4 }}
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

{{/* "true" when the NSID .collection is matched by one of the .patterns (empty = every collection). */}}
{{- define "atproto-backfill.consumed" -}}
{{- $c := .collection }}
{{- $hit := not .patterns }}
{{- range .patterns }}
{{- if or (eq . $c) (and (hasSuffix ".*" .) (hasPrefix (trimSuffix "*" .) $c)) }}
{{- $hit = true }}
{{- end }}
{{- end }}
{{- if $hit }}true{{ end }}
{{- end }}

{{/*
The components that run continuously and are scraped, with their job label (= component):
a list of component names, for the liveness rules.
*/}}
{{- define "atproto-backfill.liveComponents" -}}
{{- $v := .Values }}
{{- $out := list }}
{{- if $v.producers.jetstream.enabled }}{{ $out = append $out "producer-jetstream" }}{{ end }}
{{- if $v.producers.firehose.enabled }}{{ $out = append $out "producer-firehose" }}{{ end }}
{{- if $v.repos.enabled }}{{ $out = append $out "producer-repos" }}{{ end }}
{{- if $v.consumers.postgres.enabled }}{{ $out = append $out "consumer-postgres" }}{{ end }}
{{- if $v.consumers.queue.enabled }}{{ $out = append $out "consumer-queue" }}{{ end }}
{{- toJson $out }}
{{- end }}

{{/*
Checks the schema cannot express: replica counts bounded by the partitions (a consumer group never
uses more members than partitions), credentials present where needed, a memory limit under every
consumer's memory guard, KEDA topics the consumers read.
*/}}
{{- define "atproto-backfill.validate" -}}
{{- $v := .Values }}
{{- $_ := include "atproto-backfill.image" . }}
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
{{- range $pg.autoscaling.keda.topics }}
{{- if not (include "atproto-backfill.consumed" (dict "collection" . "patterns" $pg.collections)) }}
{{- fail (printf "consumers.postgres.autoscaling.keda.topics: %s is not among consumers.postgres.collections, so its lag would never shrink" .) }}
{{- end }}
{{- end }}
{{- else if gt (int $pg.replicas) $parts }}
{{- fail (printf "consumers.postgres.replicas (%d) exceeds kafka.topicPartitions (%d): extra consumers would sit idle" (int $pg.replicas) $parts) }}
{{- end }}
{{- if and (not $v.secrets.existingSecret) (not $v.secrets.databaseUrl) }}
{{- fail "consumers.postgres needs a database: set secrets.databaseUrl or secrets.existingSecret" }}
{{- end }}
{{- end }}
{{- range $name := list "postgres" "queue" }}
{{- $c := index $v.consumers $name }}
{{- if $c.enabled }}
{{- $limit := (($c.resources | default dict).limits | default dict).memory }}
{{- if not $limit }}
{{- fail (printf "consumers.%s.resources.limits.memory is required: the memory guard (BACKFILL_MAX_MEMORY_MB) pauses the partitions below it instead of letting the kernel kill the pod" $name) }}
{{- end }}
{{- with ($c.env | default dict).BACKFILL_MAX_MEMORY_MB }}
{{- if ge (int .) (include "atproto-backfill.memoryMiB" $limit | int) }}
{{- fail (printf "consumers.%s.env.BACKFILL_MAX_MEMORY_MB (%v) must stay below resources.limits.memory (%s)" $name . $limit) }}
{{- end }}
{{- end }}
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
{{- if and (or $v.kafka.tls.caSecret $v.kafka.tls.clientCertSecret) (not (include "atproto-backfill.tlsEnabled" .)) }}
{{- fail "kafka.tls.caSecret and kafka.tls.clientCertSecret need kafka.securityProtocol SSL or SASL_SSL" }}
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
