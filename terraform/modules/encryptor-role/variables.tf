variable "name" {
  description = "Name of the IAM role that CI assumes to encrypt kmskeys blobs."
  type        = string
}

variable "path" {
  description = "IAM path of the role."
  type        = string
  default     = "/"
}

variable "kms_key_arn" {
  description = "ARN of the kmskeys KMS key (output key_arn of the kms-key module)."
  type        = string
}

variable "secret_name_prefix" {
  description = "When set, the role may only encrypt names under this prefix: kmskeys_name must match \"<prefix>/*\". Empty allows any name (a name is still required)."
  type        = string
  default     = ""

  validation {
    condition     = var.secret_name_prefix == "" || can(regex("^[A-Za-z0-9][A-Za-z0-9_.@+-]*(/[A-Za-z0-9_.@+-]+)*$", var.secret_name_prefix))
    error_message = "The prefix must be a kmskeys name without a trailing slash and without wildcards."
  }
}

variable "github_repository" {
  description = "GitHub repository (owner/name) whose Actions workflows may assume the role through OIDC. Empty disables the GitHub trust."
  type        = string
  default     = ""

  validation {
    condition     = var.github_repository == "" || can(regex("^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$", var.github_repository))
    error_message = "The repository must be owner/name, without wildcards."
  }
}

variable "github_branches" {
  description = "Branches whose workflow runs may assume the role (token sub repo:<repo>:ref:refs/heads/<branch>)."
  type        = list(string)
  default     = ["main"]

  validation {
    condition     = alltrue([for b in var.github_branches : b != "" && b != "*"])
    error_message = "A branch may not be empty or the bare wildcard *."
  }
}

variable "github_environments" {
  description = "GitHub deployment environments whose jobs may assume the role (token sub repo:<repo>:environment:<env>)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for e in var.github_environments : e != "" && e != "*"])
    error_message = "An environment may not be empty or the bare wildcard *."
  }
}

variable "github_oidc_provider_arn" {
  description = "ARN of the account's IAM OIDC provider for token.actions.githubusercontent.com. Empty means the provider in this account (created with create_github_oidc_provider, or already present)."
  type        = string
  default     = ""
}

variable "create_github_oidc_provider" {
  description = "Create the account's GitHub Actions OIDC provider. There can be only one per account: leave false when it exists."
  type        = bool
  default     = false
}

variable "trusted_principal_arns" {
  description = "Plain IAM principals (for example a build server's role) that may assume the role, as an alternative or an addition to GitHub OIDC."
  type        = list(string)
  default     = []
}

variable "max_session_duration" {
  description = "Maximum session length in seconds (3600 to 43200)."
  type        = number
  default     = 3600
}

variable "permissions_boundary_arn" {
  description = "ARN of a permissions boundary for the role, or null."
  type        = string
  default     = null
}

variable "tags" {
  description = "Tags for the role."
  type        = map(string)
  default     = {}
}
