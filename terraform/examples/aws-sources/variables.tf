variable "region" {
  description = "AWS Region of the secret, the parameter, the hosts and the rules."
  type        = string
  default     = "eu-west-1"
}

variable "name" {
  description = "Name stem for every resource of the example; also the path of its secret (NAME/db) and parameter (/NAME/db/password)."
  type        = string
  default     = "kmskeys-sources"
}

variable "db_password" {
  description = "The first value of the example's secret and parameter. Rotation replaces it later; terraform then leaves the value alone."
  type        = string
  sensitive   = true
}

variable "secret_recovery_window_in_days" {
  description = "Days a deleted secret can be restored (0 deletes at once, 7 to 30 otherwise)."
  type        = number
  default     = 7
}

variable "fleet_tag_key" {
  description = "Tag key that marks the hosts a rotation reaches."
  type        = string
  default     = "kmskeys-fleet"
}

variable "fleet_tag_value" {
  description = "Tag value of this example's hosts."
  type        = string
  default     = "sources-example"
}

variable "max_concurrency" {
  description = "How many hosts flush at once after a rotation (Run Command MaxConcurrency)."
  type        = string
  default     = "10%"
}

variable "kmskeys_path" {
  description = "Where the hosts have the kmskeys command (the launch template's cloud-init links /usr/local/bin/kmskeys)."
  type        = string
  default     = "/usr/local/bin/kmskeys"
}

variable "image_id" {
  description = "Debian or Ubuntu AMI for the hosts' launch template; null creates no launch template."
  type        = string
  default     = null
}

variable "kmskeys_wheel" {
  description = "The kmskeys wheel CI published (make dist), for the launch template; null creates no launch template."
  type        = string
  default     = null
}

variable "tags" {
  description = "Tags for every resource of the example."
  type        = map(string)
  default     = { project = "kmskeys-sources-example" }
}
