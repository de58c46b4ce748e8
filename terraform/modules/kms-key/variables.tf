variable "description" {
  description = "Description of the KMS key, as shown in the console."
  type        = string
  default     = "kmskeys: secrets bound to their name by the encryption context"
}

variable "alias_name" {
  description = "Alias of the key, starting with alias/ (for example alias/kmskeys-prod)."
  type        = string

  validation {
    condition     = can(regex("^alias/[A-Za-z0-9/_-]+$", var.alias_name)) && !startswith(var.alias_name, "alias/aws/")
    error_message = "The alias must start with alias/, use only A-Z a-z 0-9 / _ - and not be in the reserved alias/aws/ space."
  }
}

variable "deletion_window_in_days" {
  description = "Days between a deletion request and the key's destruction (7 to 30). Blobs are unrecoverable after that."
  type        = number
  default     = 30

  validation {
    condition     = var.deletion_window_in_days >= 7 && var.deletion_window_in_days <= 30
    error_message = "The deletion window must be between 7 and 30 days."
  }
}

variable "rotation_period_in_days" {
  description = "Days between automatic rotations of the key material (90 to 2560). Old material stays available, so existing blobs keep decrypting."
  type        = number
  default     = 365

  validation {
    condition     = var.rotation_period_in_days >= 90 && var.rotation_period_in_days <= 2560
    error_message = "The rotation period must be between 90 and 2560 days."
  }
}

variable "multi_region" {
  description = "Create a multi-Region primary key, so that replicas in other Regions decrypt the same blobs."
  type        = bool
  default     = false
}

variable "encryptor_principal_arns" {
  description = "IAM principals (the CI encryptor roles) that may Encrypt and GenerateDataKey, and only with a kmskeys_name in the encryption context."
  type        = list(string)
  default     = []
}

variable "decryptor_principal_arns" {
  description = "IAM principals (the resolver host roles) that may Decrypt, and only with a kmskeys_name in the encryption context."
  type        = list(string)
  default     = []
}

variable "encrypt_name_patterns" {
  description = "StringLike patterns the kmskeys_name context value must match for Encrypt and GenerateDataKey (for example [\"prod/*\"]). [\"*\"] allows any name, yet still requires one."
  type        = list(string)
  default     = ["*"]

  validation {
    condition     = length(var.encrypt_name_patterns) > 0
    error_message = "Give at least one pattern; use [\"*\"] to allow any name."
  }
}

variable "decrypt_name_patterns" {
  description = "StringLike patterns the kmskeys_name context value must match for Decrypt. [\"*\"] allows any name, yet still requires one."
  type        = list(string)
  default     = ["*"]

  validation {
    condition     = length(var.decrypt_name_patterns) > 0
    error_message = "Give at least one pattern; use [\"*\"] to allow any name."
  }
}

variable "create_seal_key" {
  description = "Also create the seal key of the stored: keystore (seal = \"kms\"), alias <alias_name>-seal. Off by default."
  type        = bool
  default     = false
}

variable "sealer_principal_arns" {
  description = "Host roles that may Encrypt, Decrypt and GenerateDataKey under the seal key, only with kmskeys_host equal to their own instance ARN (ec2:SourceInstanceARN) and kmskeys_seal = stored."
  type        = list(string)
  default     = []
}

variable "key_administrator_arns" {
  description = "Extra IAM principals allowed to administer the key (never to use it). The account root always keeps administration."
  type        = list(string)
  default     = []
}

variable "tags" {
  description = "Tags for the key."
  type        = map(string)
  default     = {}
}
