variable "name" {
  description = "Name of the host role, instance profile and launch template."
  type        = string
}

variable "path" {
  description = "IAM path of the role and instance profile."
  type        = string
  default     = "/"
}

variable "kms_key_arn" {
  description = "ARN of the kmskeys KMS key (output key_arn of the kms-key module)."
  type        = string
}

variable "allowed_secret_names" {
  description = "StringLike patterns of the kmskeys names these hosts may decrypt (for example [\"web/*\", \"db-password\"]). [\"*\"] allows any name, yet still requires one."
  type        = list(string)
  default     = ["*"]

  validation {
    condition     = length(var.allowed_secret_names) > 0 && alltrue([for n in var.allowed_secret_names : n != ""])
    error_message = "Give at least one non-empty pattern; use [\"*\"] to allow any name."
  }
}

variable "secretsmanager_secret_names" {
  description = "Secrets Manager secrets the hosts may read with GetSecretValue (the resolver's sm: backend), by name or pattern: prod/db is exactly that secret, prod/* every secret under prod/. Empty (the default): no Secrets Manager permission."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for n in var.secretsmanager_secret_names : can(regex("^[A-Za-z0-9/_+=.@-][A-Za-z0-9/_+=.@*?-]{0,511}$", n))])
    error_message = "Each entry must be a secret name or a pattern that starts with a name character (letters, digits, / _ + = . @ -; then * or ? as wildcards): never a bare *."
  }
}

variable "ssm_parameter_names" {
  description = "Parameter Store parameters the hosts may read with GetParameter and GetParameters (the resolver's ssm: backend), by name or pattern: /prod/db/password, /prod/db/*. Empty (the default): no Parameter Store permission."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for n in var.ssm_parameter_names : can(regex("^/?[A-Za-z0-9_.-][A-Za-z0-9_./*?-]{0,1000}$", n))])
    error_message = "Each entry must be a parameter name or a pattern that starts with a name character after an optional / (letters, digits, _ . - /; then * or ?): never a bare * or /*."
  }
}

variable "secrets_kms_key_arns" {
  description = "Customer managed KMS keys that encrypt those secrets and SecureString parameters. The hosts may Decrypt with them only through Secrets Manager or Parameter Store (kms:ViaService) and only under the given secrets' and parameters' encryption context. Leave empty for the AWS managed keys aws/secretsmanager and aws/ssm, whose key policies allow exactly that use. Not the kmskeys key: its policy refuses any use without a kmskeys_name."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for a in var.secrets_kms_key_arns : can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[A-Za-z0-9-]+$", a))])
    error_message = "Each entry must be a KMS key ARN (arn:...:kms:REGION:ACCOUNT:key/ID), not an alias."
  }
}

variable "deny_unlisted_sources" {
  description = "Explicitly deny secretsmanager:GetSecretValue and ssm:GetParameter* on every secret and parameter not listed, so that a broader policy attached to the role later (AmazonSSMManagedInstanceCore allows ssm:GetParameter on every parameter) cannot widen what the hosts read."
  type        = bool
  default     = true
}

variable "enable_ssm_agent" {
  description = "Give the SSM Agent what Run Command needs (the fleet-rotation module reaches the hosts through it): AmazonSSMManagedInstanceCore's registration and message actions, without its ssm:GetParameter on every parameter. Off by default."
  type        = bool
  default     = false
}

variable "permissions_boundary_arn" {
  description = "ARN of a permissions boundary for the role, or null."
  type        = string
  default     = null
}

variable "create_launch_template" {
  description = "Create a hardened launch template (IMDSv2 only, hop limit 1, kmskeys installed by cloud-init)."
  type        = bool
  default     = true
}

variable "image_id" {
  description = "AMI for the launch template: a Debian or Ubuntu image with cloud-init (packages are installed with apt)."
  type        = string
  default     = null
}

variable "instance_type" {
  description = "Instance type of the launch template."
  type        = string
  default     = "t3.micro"
}

variable "security_group_ids" {
  description = "Security groups of the launch template's network interface."
  type        = list(string)
  default     = []
}

variable "root_volume_size" {
  description = "Size in GiB of the encrypted root volume."
  type        = number
  default     = 20
}

variable "root_device_name" {
  description = "Root device name of the AMI (/dev/xvda on Debian AMIs, /dev/sda1 on Ubuntu)."
  type        = string
  default     = "/dev/xvda"
}

variable "ebs_kms_key_arn" {
  description = "KMS key for the root volume's encryption, or null for the account's EBS default key. Not the kmskeys key: hosts may not GenerateDataKey with it."
  type        = string
  default     = null
}

variable "imds_ipv6" {
  description = "Also serve IMDS on its IPv6 address fd00:ec2::254 (the host firewall covers both)."
  type        = bool
  default     = false
}

variable "os_packages" {
  description = "Debian packages cloud-init installs before kmskeys: the kernel key tools, and a venv for the resolver."
  type        = list(string)
  default     = ["keyutils", "python3-venv", "nftables"]
}

variable "kmskeys_wheel" {
  description = "Where cloud-init gets kmskeys: the wheel `make dist` builds, as published by CI. An https:// URL, or s3://BUCKET/KEY fetched with the instance role (the role then gets s3:GetObject on that one object). Needed by the launch template."
  type        = string
  default     = null

  validation {
    condition     = var.kmskeys_wheel == null || can(regex("^(https://[^/?#\\s]+|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/([^?#\\s]+/)?kmskeys-[^/?#\\s]+\\.whl$", var.kmskeys_wheel))
    error_message = "kmskeys_wheel must be https://HOST/.../kmskeys-*.whl or s3://BUCKET/.../kmskeys-*.whl."
  }
}

variable "kmskeys_wheel_sha256" {
  description = "SHA-256 of the wheel (hex). When set, pip refuses a wheel with another digest before installing anything."
  type        = string
  default     = null

  validation {
    condition     = var.kmskeys_wheel_sha256 == null || can(regex("^[0-9a-f]{64}$", var.kmskeys_wheel_sha256))
    error_message = "kmskeys_wheel_sha256 must be 64 lowercase hex digits (sha256sum of the wheel)."
  }
}

variable "enable_seal" {
  description = "Let the hosts use the seal key of the stored: keystore (seal = \"kms\"): Encrypt, Decrypt and GenerateDataKey under seal_key_arn, only bound to their own instance ARN. Off by default."
  type        = bool
  default     = false
}

variable "seal_key_arn" {
  description = "ARN of the seal key (output seal_key_arn of the kms-key module with create_seal_key = true). Needed by enable_seal."
  type        = string
  default     = null
}

variable "resolver_config" {
  description = "Contents of /etc/kmskeys/resolver.toml (root-owned, mode 0600). Empty keeps what kmskeys-resolver install writes."
  type        = string
  default     = ""
}

variable "tags" {
  description = "Tags for the role, instance profile, launch template and the instances and volumes it starts."
  type        = map(string)
  default     = {}
}
