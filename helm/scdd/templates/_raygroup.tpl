{{/*
One workerGroupSpecs entry. Call with (dict "root" $ "g" <group values> "main" <bool>): the main
group (ray.workers) has every field in values.yaml; an additional group falls back to CPU-only
defaults for the fields it leaves out.
*/}}
{{- define "scdd.rayWorkerGroup" -}}
{{- $root := .root }}
{{- $g := .g }}
{{- $gpus := 0 }}
{{- if hasKey $g "gpus" }}{{ $gpus = int $g.gpus }}{{ end }}
{{- $gpuName := $g.gpuResourceName | default "nvidia.com/gpu" }}
{{- $resources := deepCopy ($g.resources | default (dict "requests" (dict "cpu" "2" "memory" "8Gi") "limits" (dict "memory" "8Gi"))) }}
{{- if gt $gpus 0 }}
{{- $limits := $resources.limits | default dict }}
{{- $_ := set $limits $gpuName $gpus }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- $min := int $g.minReplicas }}
{{- $max := int $g.maxReplicas }}
{{- $replicas := int ($g.replicas | default 0) }}
{{- $replicas = max $min (min $replicas $max) }}
- groupName: {{ $g.groupName }}
  minReplicas: {{ $min }}
  maxReplicas: {{ $max }}
  {{- if not $root.Values.ray.autoscaler.enabled }}
  replicas: {{ $replicas }}
  {{- end }}
  rayStartParams:
    {{- range $k, $v := ($g.rayStartParams | default dict) }}
    {{ $k }}: {{ $v | toString | quote }}
    {{- else }} {}
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "scdd.labels" (list $root "ray-worker") | trim | nindent 8 }}
        {{- with $g.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $g.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "scdd.serviceAccountName" $root }}
      automountServiceAccountToken: false
      {{- include "scdd.imagePullSecrets" $root | trim | nindent 6 }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      {{- with $g.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "scdd.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          ports:
            - name: metrics
              containerPort: 8080
          env:
            {{- include "scdd.env.rayAuth" $root | trim | nindent 12 }}
            - name: RAY_USAGE_STATS_ENABLED
              value: "0"
            {{- include "scdd.env.redis" $root | trim | nindent 12 }}
            {{- include "scdd.env.settings" $root | trim | nindent 12 }}
            {{- include "scdd.env.s3" $root | trim | nindent 12 }}
          # Ray's raylet health endpoint (no auth token needed); setting the probes keeps KubeRay
          # from injecting its wget-based ones.
          readinessProbe:
            httpGet:
              path: /api/local_raylet_healthz
              port: 52365
            initialDelaySeconds: 10
            periodSeconds: 5
            timeoutSeconds: 5
            failureThreshold: 10
          livenessProbe:
            httpGet:
              path: /api/local_raylet_healthz
              port: 52365
            initialDelaySeconds: 30
            periodSeconds: 5
            timeoutSeconds: 5
            failureThreshold: 120
          resources:
            {{- toYaml $resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            - name: ray-logs
              mountPath: /tmp/ray
            - name: shared-mem
              mountPath: /dev/shm
            {{- include "scdd.sharedVolumeMounts" $root | trim | nindent 12 }}
      volumes:
        {{- include "scdd.volume.tmp" $root | trim | nindent 8 }}
        - name: ray-logs
          emptyDir: {{ if $g.tmpSizeLimit }}{sizeLimit: {{ $g.tmpSizeLimit }}}{{ else }}{}{{ end }}
        - name: shared-mem
          emptyDir:
            medium: Memory
            sizeLimit: {{ $g.shmSize | default "2Gi" }}
        {{- include "scdd.sharedVolumes" $root | trim | nindent 8 }}
      {{- with $g.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}
