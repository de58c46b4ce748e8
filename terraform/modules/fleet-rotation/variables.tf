variable "name" {
  description = "Name stem of the rules, the SSM documents and the roles (for example kmskeys-web). SSM refuses document names starting with aws, amazon or amzn."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9_.-]{2,39}$", var.name)) && !can(regex("^(?i)(aws|amazon|amzn)", var.name))
    error_message = "name must be 3 to 40 of A-Z a-z 0-9 _ . - (starting with a letter or digit), and not start with aws, amazon or amzn."
  }
}

variable "target_tag_key" {
  description = "Tag key that marks the kmskeys hosts: every instance with target_tag_key = target_tag_value runs the flush."
  type        = string
  default     = "kmskeys-fleet"

  validation {
    condition     = can(regex("^[A-Za-z0-9_.:/=+@-]{1,128}$", var.target_tag_key)) && !startswith(var.target_tag_key, "aws:")
    error_message = "target_tag_key must be a plain EC2 tag key (no spaces, not aws:...)."
  }
}

variable "target_tag_value" {
  description = "Tag value of the kmskeys hosts this module reaches (for example web)."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z0-9_.:/=+@-]{1,256}$", var.target_tag_value))
    error_message = "target_tag_value must be a plain EC2 tag value (no spaces, no wildcards)."
  }
}

variable "kmskeys_path" {
  description = "Absolute path of the kmskeys command on the hosts (the resolver-host module's cloud-init links /usr/local/bin/kmskeys). Baked into the command document."
  type        = string
  default     = "/usr/local/bin/kmskeys"

  validation {
    condition     = can(regex("^/[A-Za-z0-9_.+/-]+$", var.kmskeys_path)) && !strcontains(var.kmskeys_path, "..")
    error_message = "kmskeys_path must be an absolute path of letters, digits and _ . + / - (no ..)."
  }
}

variable "dispatch" {
  description = "How an event reaches the hosts. \"automation\" (default): EventBridge starts an SSM Automation runbook whose aws:runCommand step sends the command with max_concurrency and max_errors. \"run_command\": EventBridge's own Run Command target (run_command_targets); it cannot set rate controls, so SSM's SendCommand defaults apply (50 hosts at a time, stop at the first error) and max_concurrency and max_errors must stay null."
  type        = string
  default     = "automation"

  validation {
    condition     = contains(["automation", "run_command"], var.dispatch)
    error_message = "dispatch must be \"automation\" or \"run_command\"."
  }
}

variable "max_concurrency" {
  description = "Run Command MaxConcurrency (a count such as 10 or a percentage such as 10%): how many hosts flush at once. Applies with dispatch = \"automation\" (the runbook's aws:runCommand step); null means 10%. See docs/scale.md for what it does to the Secrets Manager and Parameter Store request rates."
  type        = string
  default     = null

  validation {
    condition     = var.max_concurrency == null || can(regex("^([1-9][0-9]{0,5}|[1-9][0-9]?%|100%)$", coalesce(var.max_concurrency, "1")))
    error_message = "max_concurrency must be a count (1 or more) or a percentage from 1% to 100%."
  }
}

variable "max_errors" {
  description = "Run Command MaxErrors (a count or a percentage): failed hosts after which SSM stops sending the flush to more hosts. Applies with dispatch = \"automation\"; null means 10%, so one broken host does not stop a rotation from reaching the others."
  type        = string
  default     = null

  validation {
    condition     = var.max_errors == null || can(regex("^(0|[1-9][0-9]{0,5}|[0-9]%|[1-9][0-9]%|100%)$", coalesce(var.max_errors, "0")))
    error_message = "max_errors must be a count (0 or more) or a percentage from 0% to 100%."
  }
}

variable "flush_jitter_seconds" {
  description = "Each host waits a random 0..N seconds before it flushes, spreading the fleet's re-resolutions (0: flush at once). A waiting host holds its MaxConcurrency slot."
  type        = number
  default     = 0

  validation {
    condition     = var.flush_jitter_seconds >= 0 && var.flush_jitter_seconds <= 600 && floor(var.flush_jitter_seconds) == var.flush_jitter_seconds
    error_message = "flush_jitter_seconds must be a whole number of seconds from 0 to 600."
  }
}

variable "command_timeout_seconds" {
  description = "How long the flush may run on a host before SSM stops it (the document's timeoutSeconds)."
  type        = number
  default     = 120

  validation {
    condition     = var.command_timeout_seconds >= 30 && var.command_timeout_seconds <= 3600
    error_message = "command_timeout_seconds must be between 30 and 3600."
  }
}

variable "secretsmanager_events" {
  description = "Flush on Secrets Manager changes: the CloudTrail-delivered API calls in secretsmanager_api_calls and the RotationSucceeded service event. EventBridge receives CloudTrail events only where a trail records management events."
  type        = bool
  default     = true
}

variable "secretsmanager_api_calls" {
  description = "Secrets Manager API calls that change what a host should serve. A PutSecretValue that only stages AWSPENDING (a rotation function's first step) is never one of them."
  type        = list(string)
  default     = ["PutSecretValue", "UpdateSecret", "UpdateSecretVersionStage", "DeleteSecret", "RestoreSecret"]

  validation {
    condition     = length(var.secretsmanager_api_calls) > 0 && alltrue([for c in var.secretsmanager_api_calls : contains(["PutSecretValue", "UpdateSecret", "UpdateSecretVersionStage", "DeleteSecret", "RestoreSecret", "CancelRotateSecret"], c)])
    error_message = "secretsmanager_api_calls may list PutSecretValue, UpdateSecret, UpdateSecretVersionStage, DeleteSecret, RestoreSecret and CancelRotateSecret."
  }
}

variable "secretsmanager_prefix" {
  description = "The kmskeys description prefix of Secrets Manager secrets on the hosts (the resolver's sm: backend): a change of secret NAME flushes PREFIX:NAME."
  type        = string
  default     = "sm"

  validation {
    condition     = can(regex("^[a-z][a-z0-9_-]{0,31}$", var.secretsmanager_prefix))
    error_message = "secretsmanager_prefix must match [a-z][a-z0-9_-]{0,31}."
  }
}

variable "secretsmanager_path_prefix" {
  description = "When the resolver maps kmskeys names to secrets under a path (name db -> secret prod/db), that path with its trailing slash (prod/): it is removed from the secret's name, and secrets outside it flush nothing. Empty: the secret's name is the kmskeys name."
  type        = string
  default     = ""

  validation {
    condition     = can(regex("^([A-Za-z0-9][A-Za-z0-9_.@+-]{0,99}/){0,10}$", var.secretsmanager_path_prefix))
    error_message = "secretsmanager_path_prefix must be empty or kmskeys path segments each ending in / (for example prod/)."
  }
}

variable "secret_name_prefixes" {
  description = "Only changes of secrets whose names start with one of these trigger a flush (for example [\"prod/\"]); matched on the name and on the secret's ARN. Empty: every secret of the account and Region."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for p in var.secret_name_prefixes : can(regex("^[A-Za-z0-9][A-Za-z0-9_./@+=-]{0,511}$", p))])
    error_message = "Each prefix must be the start of a Secrets Manager name: letters, digits and _ . / @ + = -, no wildcards."
  }
}

variable "parameterstore_events" {
  description = "Flush on Parameter Store changes (the \"Parameter Store Change\" events: Create, Update, Delete, LabelParameterVersion)."
  type        = bool
  default     = true
}

variable "parameterstore_prefix" {
  description = "The kmskeys description prefix of Parameter Store parameters on the hosts (the resolver's ssm: backend): a change of /a/b flushes PREFIX:a/b (the leading / is not part of a kmskeys name)."
  type        = string
  default     = "ssm"

  validation {
    condition     = can(regex("^[a-z][a-z0-9_-]{0,31}$", var.parameterstore_prefix))
    error_message = "parameterstore_prefix must match [a-z][a-z0-9_-]{0,31}."
  }
}

variable "parameterstore_path_prefix" {
  description = "Like secretsmanager_path_prefix, for parameter names once their leading / is removed (prod/ for parameters under /prod/)."
  type        = string
  default     = ""

  validation {
    condition     = can(regex("^([A-Za-z0-9][A-Za-z0-9_.@+-]{0,99}/){0,10}$", var.parameterstore_path_prefix))
    error_message = "parameterstore_path_prefix must be empty or kmskeys path segments each ending in / (for example prod/)."
  }
}

variable "parameter_name_prefixes" {
  description = "Only changes of parameters whose names start with one of these trigger a flush (for example [\"/prod/\"]). Empty: every parameter of the account and Region."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for p in var.parameter_name_prefixes : can(regex("^/?[A-Za-z0-9_.-][A-Za-z0-9_./-]{0,1000}$", p))])
    error_message = "Each prefix must be the start of a parameter name: letters, digits and _ . / -, no wildcards."
  }
}

variable "kms_rotation_key_arns" {
  description = "KMS keys whose rotation (the \"KMS CMK Rotation\" event) flushes kms_rotation_names. Rotation keeps the old key material, so existing blobs still decrypt: wire it only if your pipeline re-encrypts those blobs when the key rotates. Empty: no KMS rule."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for a in var.kms_rotation_key_arns : can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[A-Za-z0-9-]+$", a))])
    error_message = "Each entry must be a KMS key ARN (arn:...:kms:REGION:ACCOUNT:key/ID)."
  }
}

variable "kms_rotation_names" {
  description = "kmskeys names flushed (under kms_rotation_prefix) when a key of kms_rotation_key_arns rotates; at most 20."
  type        = list(string)
  default     = []

  validation {
    condition     = length(var.kms_rotation_names) <= 20 && alltrue([for n in var.kms_rotation_names : can(regex("^[A-Za-z0-9][A-Za-z0-9_./@+-]{0,199}$", n)) && !strcontains(n, "..") && !strcontains(n, "//") && !endswith(n, "/")])
    error_message = "kms_rotation_names holds at most 20 kmskeys names ([A-Za-z0-9][A-Za-z0-9_./@+-]*, no .., no empty path segment)."
  }
}

variable "kms_rotation_prefix" {
  description = "The kmskeys description prefix of kms_rotation_names (kms for blobs)."
  type        = string
  default     = "kms"

  validation {
    condition     = can(regex("^[a-z][a-z0-9_-]{0,31}$", var.kms_rotation_prefix))
    error_message = "kms_rotation_prefix must match [a-z][a-z0-9_-]{0,31}."
  }
}

variable "custom_events" {
  description = "Flush on kmskeys' own event: source \"kmskeys\", detail-type \"kmskeys Flush Request\", detail {\"name\": NAME, \"prefix\": PREFIX} on the default event bus (schema: terraform/README.md). A deploy step sends it after it ships a new blob."
  type        = bool
  default     = true
}

variable "custom_event_prefixes" {
  description = "Description prefixes a kmskeys Flush Request may name; events naming any other prefix match no rule."
  type        = list(string)
  default     = ["kms", "sm", "ssm"]

  validation {
    condition     = length(var.custom_event_prefixes) > 0 && alltrue([for p in var.custom_event_prefixes : can(regex("^[a-z][a-z0-9_-]{0,31}$", p))])
    error_message = "custom_event_prefixes must list at least one prefix matching [a-z][a-z0-9_-]{0,31}."
  }
}

variable "permissions_boundary_arn" {
  description = "ARN of a permissions boundary for the two roles, or null."
  type        = string
  default     = null
}

variable "tags" {
  description = "Tags for the rules, documents and roles."
  type        = map(string)
  default     = {}
}
