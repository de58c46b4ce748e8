variable "region" {
  description = "AWS Region of the key, the roles and the hosts."
  type        = string
  default     = "eu-west-1"
}

variable "name" {
  description = "Name stem for every resource of the example."
  type        = string
  default     = "kmskeys-example"
}

variable "github_repository" {
  description = "GitHub repository (owner/name) whose main branch encrypts the secrets."
  type        = string
}

variable "github_environments" {
  description = "GitHub environments whose jobs may also encrypt."
  type        = list(string)
  default     = []
}

variable "create_github_oidc_provider" {
  description = "Create the account's GitHub OIDC provider (false when the account already has it)."
  type        = bool
  default     = false
}

variable "secret_name_prefix" {
  description = "CI may only encrypt names under this prefix."
  type        = string
  default     = "web"
}

variable "image_id" {
  description = "Debian or Ubuntu AMI for the resolver hosts."
  type        = string
}

variable "kmskeys_wheel" {
  description = "The kmskeys wheel CI published (make dist): https://.../kmskeys-*.whl or s3://BUCKET/.../kmskeys-*.whl."
  type        = string
}

variable "kmskeys_wheel_sha256" {
  description = "SHA-256 of that wheel (hex), checked by pip before it installs anything; null to skip the check."
  type        = string
  default     = null
}

variable "enable_seal" {
  description = "Also create the seal key of the stored: keystore and let the web hosts use it, bound to their own instance ARN."
  type        = bool
  default     = false
}

variable "security_group_ids" {
  description = "Security groups of the resolver hosts."
  type        = list(string)
  default     = []
}

variable "tags" {
  description = "Tags for every resource of the example."
  type        = map(string)
  default     = { project = "kmskeys-example" }
}
