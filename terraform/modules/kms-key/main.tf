data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

locals {
  account_root = "arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:root"

  # Everything the key can do with data. None of it is delegated to IAM through the root
  # statement: only the principals named below may use the key, whatever IAM policies say.
  data_plane_actions = [
    "kms:Encrypt",
    "kms:Decrypt",
    "kms:ReEncrypt*",
    "kms:GenerateDataKey*",
  ]

  # Administration without use: enough to manage, rotate, re-policy and schedule deletion.
  admin_actions = [
    "kms:CancelKeyDeletion",
    "kms:CreateAlias",
    "kms:DeleteAlias",
    "kms:DescribeKey",
    "kms:DisableKey",
    "kms:DisableKeyRotation",
    "kms:EnableKey",
    "kms:EnableKeyRotation",
    "kms:GetKeyPolicy",
    "kms:GetKeyRotationStatus",
    "kms:ListAliases",
    "kms:ListGrants",
    "kms:ListKeyPolicies",
    "kms:ListKeyRotations",
    "kms:ListResourceTags",
    "kms:PutKeyPolicy",
    "kms:ReplicateKey",
    "kms:RevokeGrant",
    "kms:RotateKeyOnDemand",
    "kms:ScheduleKeyDeletion",
    "kms:TagResource",
    "kms:UntagResource",
    "kms:UpdateAlias",
    "kms:UpdateKeyDescription",
    "kms:UpdatePrimaryRegion",
  ]

  administrators = distinct(concat([local.account_root], var.key_administrator_arns))

  # The seal key's binding (docs: terraform/README.md, "The seal key"). A stored: keystore entry
  # is wrapped with the context {kmskeys_seal = "stored", kmskeys_host = <instance ARN>,
  # kmskeys_scope = "user:UID" | "machine", kmskeys_name = NAME}. ec2:SourceInstanceARN is the
  # cross-service condition key that requests signed with an instance profile's credentials
  # carry; as a policy variable it is that instance's ARN, so a host can only wrap and unwrap
  # entries bound to itself. The Null test makes the statement fail closed for credentials that
  # did not come from an instance. ForAllValues on the exact key spellings refuses any other
  # context key, including a differently-cased kmskeys_host (KMS matches the key part of
  # kms:EncryptionContext:KEY case-insensitively).
  seal_conditions = [
    { test = "StringEquals", variable = "kms:EncryptionContext:kmskeys_seal", values = ["stored"] },
    { test = "StringEquals", variable = "kms:EncryptionContext:kmskeys_host", values = ["$${ec2:SourceInstanceARN}"] },
    { test = "StringLike", variable = "kms:EncryptionContext:kmskeys_scope", values = ["user:*", "machine"] },
    { test = "Null", variable = "kms:EncryptionContext:kmskeys_name", values = ["false"] },
    { test = "Null", variable = "ec2:SourceInstanceARN", values = ["false"] },
    { test = "ForAllValues:StringEquals", variable = "kms:EncryptionContextKeys", values = ["kmskeys_host", "kmskeys_name", "kmskeys_scope", "kmskeys_seal"] },
  ]

  # What a keystore entry needs: wrap (Encrypt or GenerateDataKey) and unwrap (Decrypt).
  seal_actions = ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"]
}

# Key policies are the only source of data-plane permissions here. The context conditions:
#   ForAnyValue:StringEquals kms:EncryptionContextKeys  - the request's context has a key
#     spelled exactly kmskeys_name (case-sensitive). ForAnyValue over an empty context is
#     false, so a request without any context is refused too; ForAllValues would not be.
#   Null kms:EncryptionContext:kmskeys_name = false     - that key is present with a value.
#   StringLike kms:EncryptionContext:kmskeys_name       - the value matches allowed names.
# Administration without use, the first statement of both key policies.
data "aws_iam_policy_document" "administration" {
  #checkov:skip=CKV_AWS_111:A key policy applies to its own key only; its Resource "*" is that key, and every write action is tied to named principals.
  #checkov:skip=CKV_AWS_356:In a key policy Resource "*" means this key: a key policy cannot name any other resource.
  statement {
    sid       = "AccountAdministration"
    effect    = "Allow"
    actions   = local.admin_actions
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = local.administrators
    }
  }
}

data "aws_iam_policy_document" "this" {
  #checkov:skip=CKV_AWS_111:A key policy applies to its own key only; its Resource "*" is that key, and every write action is tied to named principals.
  #checkov:skip=CKV_AWS_356:In a key policy Resource "*" means this key: a key policy cannot name any other resource.
  source_policy_documents = [data.aws_iam_policy_document.administration.json]

  statement {
    sid       = "DenyUseWithoutNameBinding"
    effect    = "Deny"
    actions   = local.data_plane_actions
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = ["*"]
    }

    condition {
      test     = "Null"
      variable = "kms:EncryptionContext:kmskeys_name"
      values   = ["true"]
    }
  }

  dynamic "statement" {
    for_each = length(var.encryptor_principal_arns) > 0 ? [1] : []

    content {
      sid       = "EncryptWithNameBinding"
      effect    = "Allow"
      actions   = ["kms:Encrypt", "kms:GenerateDataKey"]
      resources = ["*"]

      principals {
        type        = "AWS"
        identifiers = var.encryptor_principal_arns
      }

      condition {
        test     = "ForAnyValue:StringEquals"
        variable = "kms:EncryptionContextKeys"
        values   = ["kmskeys_name"]
      }

      condition {
        test     = "Null"
        variable = "kms:EncryptionContext:kmskeys_name"
        values   = ["false"]
      }

      condition {
        test     = "StringLike"
        variable = "kms:EncryptionContext:kmskeys_name"
        values   = var.encrypt_name_patterns
      }
    }
  }

  # DescribeKey carries no encryption context, so it cannot take the condition.
  dynamic "statement" {
    for_each = length(var.encryptor_principal_arns) > 0 ? [1] : []

    content {
      sid       = "EncryptorDescribeKey"
      effect    = "Allow"
      actions   = ["kms:DescribeKey"]
      resources = ["*"]

      principals {
        type        = "AWS"
        identifiers = var.encryptor_principal_arns
      }
    }
  }

  dynamic "statement" {
    for_each = length(var.decryptor_principal_arns) > 0 ? [1] : []

    content {
      sid       = "DecryptWithNameBinding"
      effect    = "Allow"
      actions   = ["kms:Decrypt"]
      resources = ["*"]

      principals {
        type        = "AWS"
        identifiers = var.decryptor_principal_arns
      }

      condition {
        test     = "ForAnyValue:StringEquals"
        variable = "kms:EncryptionContextKeys"
        values   = ["kmskeys_name"]
      }

      condition {
        test     = "Null"
        variable = "kms:EncryptionContext:kmskeys_name"
        values   = ["false"]
      }

      condition {
        test     = "StringLike"
        variable = "kms:EncryptionContext:kmskeys_name"
        values   = var.decrypt_name_patterns
      }
    }
  }
}

resource "aws_kms_key" "this" {
  description              = var.description
  key_usage                = "ENCRYPT_DECRYPT"
  customer_master_key_spec = "SYMMETRIC_DEFAULT"
  enable_key_rotation      = true
  rotation_period_in_days  = var.rotation_period_in_days
  deletion_window_in_days  = var.deletion_window_in_days
  multi_region             = var.multi_region
  is_enabled               = true
  policy                   = data.aws_iam_policy_document.this.json

  # The lockout check stays on: the root statement keeps kms:PutKeyPolicy.
  bypass_policy_lockout_safety_check = false

  tags = var.tags

  lifecycle {
    precondition {
      condition     = length(setintersection(var.encryptor_principal_arns, var.decryptor_principal_arns)) == 0
      error_message = "A principal may encrypt or decrypt, never both: encryptor_principal_arns and decryptor_principal_arns overlap."
    }
  }
}

resource "aws_kms_alias" "this" {
  name          = var.alias_name
  target_key_id = aws_kms_key.this.key_id
}

# The optional seal key of the stored: keystore (`seal = "kms"`). A separate key, because the
# decrypt-only host role may never Encrypt under the secrets key above.
data "aws_iam_policy_document" "seal" {
  count = var.create_seal_key ? 1 : 0

  #checkov:skip=CKV_AWS_111:A key policy applies to its own key only; its Resource "*" is that key, and every write action is tied to named principals.
  #checkov:skip=CKV_AWS_356:In a key policy Resource "*" means this key: a key policy cannot name any other resource.
  source_policy_documents = [data.aws_iam_policy_document.administration.json]

  statement {
    sid       = "DenyUseWithoutHostBinding"
    effect    = "Deny"
    actions   = local.data_plane_actions
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = ["*"]
    }

    condition {
      test     = "Null"
      variable = "kms:EncryptionContext:kmskeys_host"
      values   = ["true"]
    }
  }

  dynamic "statement" {
    for_each = length(var.sealer_principal_arns) > 0 ? [1] : []

    content {
      sid       = "SealWithHostBinding"
      effect    = "Allow"
      actions   = local.seal_actions
      resources = ["*"]

      principals {
        type        = "AWS"
        identifiers = var.sealer_principal_arns
      }

      dynamic "condition" {
        for_each = local.seal_conditions

        content {
          test     = condition.value.test
          variable = condition.value.variable
          values   = condition.value.values
        }
      }
    }
  }
}

resource "aws_kms_key" "seal" {
  count = var.create_seal_key ? 1 : 0

  description              = "kmskeys seal: stored: keystore entries, each bound to its host, scope and name"
  key_usage                = "ENCRYPT_DECRYPT"
  customer_master_key_spec = "SYMMETRIC_DEFAULT"
  enable_key_rotation      = true
  rotation_period_in_days  = var.rotation_period_in_days
  deletion_window_in_days  = var.deletion_window_in_days
  is_enabled               = true
  policy                   = data.aws_iam_policy_document.seal[0].json

  bypass_policy_lockout_safety_check = false

  tags = var.tags
}

resource "aws_kms_alias" "seal" {
  count = var.create_seal_key ? 1 : 0

  name          = "${var.alias_name}-seal"
  target_key_id = aws_kms_key.seal[0].key_id
}
