{{/* Names */}}
{{- define "scdd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "scdd.fullname" -}}
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

{{/* "<fullname>-<suffix>", at most 63 characters. Call with (list $ "suffix"). */}}
{{- define "scdd.componentName" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 }}
{{- printf "%s-%s" (include "scdd.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix }}
{{- end }}

{{- define "scdd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Standard labels. Call with (list $ "component").
*/}}
{{- define "scdd.labels" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 -}}
helm.sh/chart: {{ include "scdd.chart" $root }}
{{ include "scdd.selectorLabels" (list $root $component) }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: scdd
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
{{- with $root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels. Call with (list $ "component"). */}}
{{- define "scdd.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "scdd.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "scdd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "scdd.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The Ray head's account while the autoscaler is on: the chart's "<fullname>-ray-head" (same
annotations as serviceAccount, token mounted), the named account when serviceAccount.create is
false, or empty (KubeRay then creates one named after the RayCluster).
*/}}
{{- define "scdd.rayHeadServiceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- include "scdd.componentName" (list . "ray-head") }}
{{- else }}
{{- .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "scdd.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* Ray */}}
{{- define "scdd.rayClusterName" -}}
{{- if .Values.ray.clusterName }}
{{- .Values.ray.clusterName }}
{{- else }}
{{- printf "%s-ray" (include "scdd.fullname" . | trunc 40 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{/* The Ray Jobs API (dashboard) URL: KubeRay names the head Service "<cluster>-head-svc". */}}
{{- define "scdd.rayAddress" -}}
{{- printf "http://%s-head-svc:8265" (include "scdd.rayClusterName" .) }}
{{- end }}

{{- define "scdd.rayAuthSecretName" -}}
{{- default (include "scdd.componentName" (list . "ray-auth")) .Values.ray.auth.existingSecret }}
{{- end }}

{{/* Redis */}}
{{- define "scdd.redisExternal" -}}
{{- if or .Values.redis.external.url .Values.redis.external.existingSecret }}true{{ end }}
{{- end }}

{{- define "scdd.redisName" -}}
{{- include "scdd.componentName" (list . "redis") }}
{{- end }}

{{- define "scdd.redisSecretName" -}}
{{- default (include "scdd.redisName" .) .Values.redis.auth.existingSecret }}
{{- end }}

{{/* API keys */}}
{{- define "scdd.apiKeysSecretName" -}}
{{- default (include "scdd.componentName" (list . "api-keys")) .Values.apiKeys.existingSecret }}
{{- end }}

{{- define "scdd.apiKeysSecretKey" -}}
{{- if .Values.apiKeys.existingSecret }}{{ .Values.apiKeys.existingSecretKey }}{{ else }}api-keys.yaml{{ end }}
{{- end }}

{{/*
A value kept in an existing Secret of this release, or a new random one: generated values stay the
same across upgrades (`lookup` reads the live Secret; offline renders, e.g. `helm template`, get a
fresh value). Call with (dict "root" $ "name" <secret> "key" <key> "length" <n> "prefix" <p>).
*/}}
{{- define "scdd.keptSecretValue" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .name }}
{{- if and $existing $existing.data (hasKey $existing.data .key) }}
{{- index $existing.data .key | b64dec }}
{{- else }}
{{- printf "%s%s" (default "" .prefix) (randAlphaNum (int .length)) }}
{{- end }}
{{- end }}

{{/* Environment */}}

{{/* REDIS_URL (and REDIS_PASSWORD it refers to) for every scdd container. */}}
{{- define "scdd.env.redis" -}}
{{- if .Values.redis.external.existingSecret }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.existingSecretKey }}
{{- else if .Values.redis.external.url }}
- name: REDIS_URL
  value: {{ .Values.redis.external.url | quote }}
{{- else if .Values.redis.auth.enabled }}
# (not REDIS_PASSWORD: KubeRay gives that name a meaning on Ray heads, for GCS fault tolerance)
- name: SCDD_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "scdd.redisSecretName" . }}
      key: {{ .Values.redis.auth.existingSecretKey }}
- name: REDIS_URL
  value: {{ printf "redis://:$(SCDD_REDIS_PASSWORD)@%s:6379/0" (include "scdd.redisName" .) | quote }}
{{- else }}
- name: REDIS_URL
  value: {{ printf "redis://%s:6379/0" (include "scdd.redisName" .) | quote }}
{{- end }}
{{- end }}

{{/*
Job bounds derived from the worker groups (docs/deployment.md, "Sizing the chart for 8 and 64 GPUs").
The GPUs the worker groups can ever hold: gpus x maxReplicas of ray.workers (when enabled) plus those of
every additional group.
*/}}
{{- define "scdd.groupGpus" -}}
{{- $ray := .Values.ray -}}
{{- $total := 0 -}}
{{- if $ray.workers.enabled -}}
{{- $total = add $total (mul ($ray.workers.maxReplicas | int64) ($ray.workers.gpus | int64)) -}}
{{- end -}}
{{- range $ray.additionalWorkerGroups -}}
{{- $total = add $total (mul (.maxReplicas | int64) (.gpus | default 0 | int64)) -}}
{{- end -}}
{{- $total -}}
{{- end -}}

{{/* SCDD_MAX_GPUS: config.maxGpus, else the worker groups' GPUs (scdd.groupGpus; 0, no bound, without GPUs). */}}
{{- define "scdd.maxGpus" -}}
{{- if not (kindIs "invalid" .Values.config.maxGpus) -}}
{{- .Values.config.maxGpus | int64 -}}
{{- else -}}
{{- include "scdd.groupGpus" . -}}
{{- end -}}
{{- end -}}

{{/* SCDD_MAX_WORKERS: config.maxWorkers, else SCDD_MAX_GPUS (a job may use every GPU the service runs), else 8
(no GPU bound: the service's own default). */}}
{{- define "scdd.maxWorkers" -}}
{{- if not (kindIs "invalid" .Values.config.maxWorkers) -}}
{{- .Values.config.maxWorkers | int64 -}}
{{- else -}}
{{- $gpus := include "scdd.maxGpus" . | int64 -}}
{{- if gt $gpus 0 }}{{ $gpus }}{{ else }}8{{ end -}}
{{- end -}}
{{- end -}}

{{/* A CPU quantity ("8", 8, "0.5", "7500m") in millicores. */}}
{{- define "scdd.milliCpu" -}}
{{- $q := toString . -}}
{{- if hasSuffix "m" $q -}}
{{- trimSuffix "m" $q | int64 -}}
{{- else -}}
{{- mulf (float64 $q) 1000 | int64 -}}
{{- end -}}
{{- end -}}

{{/* A memory quantity ("48Gi", "512Mi", "16G", 1073741824) in MiB (floored). */}}
{{- define "scdd.memoryMi" -}}
{{- $q := toString . -}}
{{- $units := list (list "Ki" 1024.0) (list "Mi" 1048576.0) (list "Gi" 1073741824.0) (list "Ti" 1099511627776.0) (list "Pi" 1125899906842624.0) (list "k" 1000.0) (list "K" 1000.0) (list "M" 1000000.0) (list "G" 1000000000.0) (list "T" 1000000000000.0) (list "P" 1000000000000000.0) -}}
{{- $bytes := -1.0 -}}
{{- range $units -}}
{{- if and (lt $bytes 0.0) (hasSuffix (index . 0) $q) -}}
{{- $bytes = mulf (float64 (trimSuffix (index . 0) $q)) (index . 1) -}}
{{- end -}}
{{- end -}}
{{- if lt $bytes 0.0 }}{{ $bytes = float64 $q }}{{ end -}}
{{- divf $bytes 1048576.0 | floor | int64 -}}
{{- end -}}

{{/*
The largest node a job's driver or worker can land on, from the worker groups that can start a pod (maxReplicas
> 0): "<cpus> <memory MiB>", each the largest over those groups (0 0: none). A group's CPUs are what Ray gives it
(rayStartParams num-cpus, else KubeRay's: the CPU limit, else the request), its memory the memory limit (else the
request); an additional group without resources has the chart's default 2 CPU / 8Gi.
*/}}
{{- define "scdd.largestNode" -}}
{{- $ray := .Values.ray -}}
{{- $groups := list -}}
{{- if and $ray.workers.enabled (gt (int $ray.workers.maxReplicas) 0) }}{{ $groups = append $groups $ray.workers }}{{ end -}}
{{- range $ray.additionalWorkerGroups -}}
{{- if gt (int .maxReplicas) 0 }}{{ $groups = append $groups . }}{{ end -}}
{{- end -}}
{{- $cpu := 0 -}}
{{- $mem := 0 -}}
{{- range $groups -}}
{{- $r := .resources | default (dict "requests" (dict "cpu" "2" "memory" "8Gi") "limits" (dict "memory" "8Gi")) -}}
{{- $requests := $r.requests | default dict -}}
{{- $limits := $r.limits | default dict -}}
{{- $c := index (.rayStartParams | default dict) "num-cpus" | default $limits.cpu | default $requests.cpu -}}
{{- if not (kindIs "invalid" $c) }}{{ $cpu = max $cpu (include "scdd.milliCpu" $c | int64) }}{{ end -}}
{{- $m := $limits.memory | default $requests.memory -}}
{{- if not (kindIs "invalid" $m) }}{{ $mem = max $mem (include "scdd.memoryMi" $m | int64) }}{{ end -}}
{{- end -}}
{{- printf "%d %d" (div $cpu 1000) $mem -}}
{{- end -}}

{{/* SCDD_NODE_CPUS: config.nodeCpus, else the largest worker node's CPUs (scdd.largestNode; "": not set). */}}
{{- define "scdd.nodeCpus" -}}
{{- if not (kindIs "invalid" .Values.config.nodeCpus) -}}
{{- .Values.config.nodeCpus | int64 -}}
{{- else -}}
{{- $cpus := index (splitList " " (include "scdd.largestNode" .)) 0 | int64 -}}
{{- if gt $cpus 0 }}{{ $cpus }}{{ end -}}
{{- end -}}
{{- end -}}

{{/* SCDD_NODE_MEMORY_GIB: config.nodeMemoryGib, else the largest worker node's memory in GiB ("": not set). */}}
{{- define "scdd.nodeMemoryGib" -}}
{{- if not (kindIs "invalid" .Values.config.nodeMemoryGib) -}}
{{- .Values.config.nodeMemoryGib | toString -}}
{{- else -}}
{{- $mi := index (splitList " " (include "scdd.largestNode" .)) 1 | int64 -}}
{{- if gt $mi 0 }}{{ divf $mi 1024 | toString }}{{ end -}}
{{- end -}}
{{- end -}}

{{/*
The Ray head's container resources: ray.head.resources when set, else derived from config.maxRunning
(ray.head.sizing): memory base + maxRunning x per job (request = limit), CPU base + maxRunning x per job
(request only), for its GCS / dashboard and the drivers (with their Ray Train controllers) it hosts.
*/}}
{{- define "scdd.headResources" -}}
{{- $head := .Values.ray.head -}}
{{- if $head.resources -}}
{{- toYaml $head.resources -}}
{{- else -}}
{{- $s := $head.sizing -}}
{{- $jobs := .Values.config.maxRunning | int64 -}}
{{- $mem := add ($s.baseMemoryMi | int64) (mul $jobs ($s.memoryPerJobMi | int64)) -}}
{{- $cpu := add ($s.baseMilliCpu | int64) (mul $jobs ($s.milliCpuPerJob | int64)) -}}
{{- $memory := ternary (printf "%dGi" (div $mem 1024)) (printf "%dMi" $mem) (eq (mod $mem 1024) 0) -}}
{{- $cpus := ternary (printf "%d" (div $cpu 1000)) (printf "%dm" $cpu) (eq (mod $cpu 1000) 0) -}}
{{- toYaml (dict "requests" (dict "cpu" $cpus "memory" $memory) "limits" (dict "memory" $memory)) -}}
{{- end -}}
{{- end -}}

{{/* SCDD_WORKER_DEVICE: ray.workerDevice, else cuda when an enabled worker group has gpus > 0 (even at zero
replicas: device auto then waits for a GPU node instead of running on CPUs), else cpu. */}}
{{- define "scdd.workerDevice" -}}
{{- $ray := .Values.ray -}}
{{- $device := "cpu" -}}
{{- if and $ray.workers.enabled (gt (int $ray.workers.gpus) 0) -}}
{{- $device = "cuda" -}}
{{- end -}}
{{- range $ray.additionalWorkerGroups -}}
{{- if gt (int (.gpus | default 0)) 0 -}}
{{- $device = "cuda" -}}
{{- end -}}
{{- end -}}
{{- $ray.workerDevice | default $device -}}
{{- end -}}

{{/* The service settings (SCDD_*), HOME on the writable /tmp, and extraEnv. */}}
{{- define "scdd.env.settings" -}}
{{- $c := .Values.config }}
- name: SCDD_WORKER_DEVICE
  value: {{ include "scdd.workerDevice" . | quote }}
- name: SCDD_PLACEMENT_TIMEOUT_S
  value: {{ .Values.ray.placementTimeoutS | toString | quote }}
- name: SCDD_MAX_RESTARTS
  value: {{ .Values.ray.maxRestarts | int64 | quote }}
- name: SCDD_REDIS_PREFIX
  value: {{ $c.redisPrefix | quote }}
- name: SCDD_ARTIFACTS
  value: {{ $c.artifacts | quote }}
{{- with $c.teacherCache }}
- name: SCDD_TEACHER_CACHE
  value: {{ . | quote }}
{{- end }}
- name: SCDD_DATA_ROOTS
  value: {{ $c.dataRoots | quote }}
- name: SCDD_MAX_ACTIVE_JOBS
  value: {{ $c.maxActiveJobs | int64 | quote }}
- name: SCDD_MAX_RUNNING
  value: {{ $c.maxRunning | int64 | quote }}
- name: SCDD_MAX_GPUS
  value: {{ include "scdd.maxGpus" . | quote }}
- name: SCDD_CONSOLE
  value: {{ $c.console | toString | quote }}
- name: SCDD_MAX_BODY_BYTES
  value: {{ $c.maxBodyBytes | int64 | quote }}
- name: SCDD_EVENTS_MAXLEN
  value: {{ $c.eventsMaxlen | int64 | quote }}
- name: SCDD_IDEMPOTENCY_TTL_S
  value: {{ $c.idempotencyTtlS | int64 | quote }}
- name: SCDD_CANCEL_GRACE_S
  value: {{ $c.cancelGraceS | toString | quote }}
- name: SCDD_RECLAIM_AFTER_S
  value: {{ $c.reclaimAfterS | toString | quote }}
- name: SCDD_MAX_DELIVERIES
  value: {{ $c.maxDeliveries | int64 | quote }}
- name: SCDD_POLL_S
  value: {{ $c.pollS | toString | quote }}
- name: SCDD_MAX_WORKERS
  value: {{ include "scdd.maxWorkers" . | quote }}
{{- with include "scdd.nodeCpus" . }}
- name: SCDD_NODE_CPUS
  value: {{ . | quote }}
{{- end }}
{{- with include "scdd.nodeMemoryGib" . }}
- name: SCDD_NODE_MEMORY_GIB
  value: {{ . | quote }}
{{- end }}
{{- with $c.maxJobMemoryGib }}
- name: SCDD_MAX_JOB_MEMORY_GIB
  value: {{ . | toString | quote }}
{{- end }}
- name: SCDD_MAX_IMAGE_ITERATIONS
  value: {{ $c.maxImageIterations | int64 | quote }}
- name: SCDD_MAX_EPOCHS
  value: {{ $c.maxEpochs | int64 | quote }}
- name: SCDD_JOB_TIMEOUT_S
  value: {{ $c.jobTimeoutS | toString | quote }}
- name: SCDD_MAX_STREAMS_PER_TENANT
  value: {{ $c.maxStreamsPerTenant | int64 | quote }}
- name: SCDD_MAX_STREAMS_PER_PROCESS
  value: {{ $c.maxStreamsPerProcess | int64 | quote }}
- name: SCDD_SUBMIT_RATE
  value: {{ $c.submitRate | toString | quote }}
- name: SCDD_SUBMIT_BURST
  value: {{ $c.submitBurst | int64 | quote }}
- name: SCDD_RETENTION_DAYS
  value: {{ $c.retentionDays | toString | quote }}
# The Ray pods get REDIS_URL from the same Secret: it stays out of each Ray job's runtime_env.
- name: SCDD_JOBS_REDIS_URL
  value: cluster
- name: HOME
  value: /tmp
- name: PYTHONUNBUFFERED
  value: "1"
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "scdd.env.rayAddress" -}}
- name: RAY_ADDRESS
  value: {{ include "scdd.rayAddress" . | quote }}
{{- end }}

{{- define "scdd.env.rayAuth" -}}
{{- if .Values.ray.auth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "scdd.rayAuthSecretName" . }}
      key: {{ .Values.ray.auth.existingSecretKey }}
{{- end }}
{{- end }}

{{- define "scdd.env.s3" -}}
{{- with .Values.s3.endpointUrl }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- if .Values.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .Values.s3.existingSecret }}
      key: {{ .Values.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.s3.existingSecret }}
      key: {{ .Values.s3.secretAccessKeyKey }}
{{- end }}
{{- end }}

{{/* Volumes */}}

{{/* The writable /tmp every container gets (the root file system is read-only). */}}
{{- define "scdd.volume.tmp" -}}
- name: tmp
  emptyDir: {}
{{- end }}

{{- define "scdd.sharedVolumes" -}}
{{- range .Values.sharedVolumes }}
- name: {{ .name }}
  {{- toYaml .volume | nindent 2 }}
{{- end }}
{{- end }}

{{- define "scdd.sharedVolumeMounts" -}}
{{- range .Values.sharedVolumes }}
- name: {{ .name }}
  mountPath: {{ .mountPath }}
  readOnly: {{ hasKey . "readOnly" | ternary .readOnly true }}
  {{- with .subPath }}
  subPath: {{ . }}
  {{- end }}
{{- end }}
{{- end }}

{{- define "scdd.imagePullSecrets" -}}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Egress every scdd pod needs: DNS, and Redis (the chart's, or networkPolicy.externalRedisEgress). */}}
{{- define "scdd.egress.base" -}}
- ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- if include "scdd.redisExternal" . }}
{{ toYaml .Values.networkPolicy.externalRedisEgress }}
{{- else }}
- to:
    - podSelector:
        matchLabels:
          {{- include "scdd.selectorLabels" (list . "redis") | trim | nindent 10 }}
  ports:
    - port: 6379
      protocol: TCP
{{- end }}
{{- end }}

{{/* Egress to the Ray head's Jobs API (the dispatcher submits and follows jobs; the API's /readyz asks). */}}
{{- define "scdd.egress.rayJobsApi" -}}
- to:
    - podSelector:
        matchLabels:
          ray.io/cluster: {{ include "scdd.rayClusterName" . }}
          ray.io/node-type: head
  ports:
    - port: 8265
      protocol: TCP
{{- end }}
